"""Research tools around steered decoding, from the two seed papers (Ward et al. 2025; Venhoff et
al. 2025): residual-stream activations, steering vectors (difference of means, optimised), the
Top-K SAE taxonomy of reasoning behaviours, and analysis (logit lens, baselines, emission sweeps).
CLI: `steerfast research --help`. matplotlib (the sweep's, the taxonomy grid's and the per-layer
logit lens's PNGs) is imported only when plotting."""
from .activations import Activations, extract_activations, layer_activations, load_activations, span_rows
from .analysis import (SCALE, baselines, cosine, cosine_matrix, emission_rate, emission_sweep, generate_scaled,
                       logit_lens, plot_sweep, save_sweep, sweep_figure, sweep_table, token_ids_for, token_label)
from .figures import (balance, elbow, logit_lens_by_layer, plot_logit_lens_by_layer, plot_taxonomy_grid,
                      save_taxonomy_grid, taxonomy_grid)
from .optimize import TrainResult, eval_loss, train_bias_and_categories, train_vector
from .sae_train import (JUDGE_METRICS, categories, fvu, purity, sae_grid, score_taxonomy, taxonomy,
                        train_topk_sae)
from .spans import (Example, Record, Span, encode_with_spans, label_spans, parse_record, read_examples, read_jsonl,
                    split_sentences, write_jsonl)
from .vectors import (hybrid_vectors, label_diff_of_means, load_steering, load_vector, load_vectors, save_vector,
                      save_vector_set, steering_layer, window_diff_of_means)

__all__ = [
    "Activations", "extract_activations", "layer_activations", "load_activations", "span_rows", "SCALE",
    "baselines", "cosine", "cosine_matrix", "emission_rate", "emission_sweep", "generate_scaled", "logit_lens",
    "plot_sweep", "save_sweep", "sweep_figure", "sweep_table", "token_ids_for", "token_label", "TrainResult",
    "eval_loss", "train_bias_and_categories",
    "train_vector", "JUDGE_METRICS", "categories", "fvu", "purity", "sae_grid", "score_taxonomy", "taxonomy",
    "train_topk_sae", "Example", "Record", "Span", "encode_with_spans", "label_spans", "parse_record",
    "read_examples", "read_jsonl", "split_sentences", "write_jsonl", "hybrid_vectors", "label_diff_of_means",
    "load_steering", "load_vector", "load_vectors", "save_vector", "save_vector_set", "steering_layer",
    "window_diff_of_means", "balance", "elbow", "logit_lens_by_layer", "plot_logit_lens_by_layer",
    "plot_taxonomy_grid", "save_taxonomy_grid", "taxonomy_grid",
]
