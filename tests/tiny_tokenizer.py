"""A character-level fast tokenizer with BOS/EOS and a chat template: text in and out for tests,
nothing downloaded. Every id below `vocab_size` decodes to one character (ASCII first, then
Latin-1 and beyond), so a random model's output reads as text. Save it in a directory of its own: beside a config.json,
transformers 5's AutoTokenizer rebuilds it as that model type's tokenizer class."""
from __future__ import annotations

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def char_tokenizer(vocab_size: int = 101):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    units = ["<pad>", "<s>", "</s>", "<unk>", "\n"] + [chr(c) for c in range(32, 127)]
    units += [chr(c) for c in range(0xA1, 0xA1 + vocab_size - len(units))]
    tk = Tokenizer(models.WordLevel({u: i for i, u in enumerate(units)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tk.decoder = decoders.Fuse()
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>")
    tok.chat_template = CHAT_TEMPLATE
    return tok
