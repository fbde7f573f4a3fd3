"""A miniature of Venhoff et al. (2025) that anyone can run: `steerfast demo` (see cli.py)."""
