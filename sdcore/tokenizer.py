"""CLIP's byte-level BPE tokenizer (Radford et al. 2021), run by the ``tokenizers`` library.

The pipeline is the one ``transformers.CLIPTokenizer`` builds (so ids match it exactly):

1. normalise: NFC, every run of whitespace -> one space, lowercase;
2. pre-tokenise: CLIP's regex (``<|startoftext|>``, ``<|endoftext|>``, ``'s 't 're 've 'm 'll 'd``,
   runs of letters, single digits, runs of other non-space characters), then byte-level
   (each UTF-8 byte -> one printable unicode character, GPT-2's ``bytes_to_unicode``);
3. BPE with the end-of-word suffix ``</w>`` and 48 894 merges; vocabulary of 49 408 ids:
   256 bytes, 256 bytes + ``</w>``, one id per merge, then ``<|startoftext|>`` = 49406 and
   ``<|endoftext|>`` = 49407 (the highest id, which is how the text encoder finds it).

Every prompt becomes exactly 77 ids: ``<|startoftext|>``, at most 75 content tokens,
``<|endoftext|>``, then padding: ``<|endoftext|>`` for SD 1.x, ``"!"`` (id 0) for SD 2.x.
Longer prompts are truncated with a warning naming the prompt (index and text) and the tokens dropped.
As in transformers, the pad token is a special token, so with SD 2's "!" every "!" in a prompt
becomes id 0 (diffusers' behaviour; OpenCLIP's own tokenizer would merge "!!!" into one token).
"""
from __future__ import annotations

import gzip
import importlib.util
import json
import os
import warnings
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import BPE

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
MAX_LENGTH = 77  # CLIP's context length: BOS + 75 tokens + EOS
BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
# transformers.CLIPTokenizer's pre-tokenizer regex (OpenAI's, with \p{L} / \p{N} classes)
_PRETOKENIZE = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
_NUM_MERGES = 49152 - 256 - 2  # OpenAI CLIP uses the first 48 894 merges of the .gz file


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode character table (order matters: it is the
    order of the first 256 vocabulary ids)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def vocab_and_merges_from_bpe_file(path: str | os.PathLike) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and merges exactly as OpenAI's ``SimpleTokenizer`` builds them from the .gz."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1:_NUM_MERGES + 1]]  # line 0 is a version header
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges] + [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}, merges


def default_bpe_path() -> Path:
    """The vocabulary shipped inside the ``clip`` package (clip-anytorch), found without importing
    it (its ``__init__`` needs packages we do not install)."""
    spec = importlib.util.find_spec("clip")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in locations:
        path = Path(folder) / BPE_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"CLIP's vocabulary {BPE_FILE} was not found: the `clip` package is "
        f"{'installed without it' if locations else 'not installed'}. Install it with "
        "`pip install --no-deps clip-anytorch`, or load a tokenizer folder with "
        "CLIPTokenizer.from_folder(path) (a diffusers `tokenizer/` folder: vocab.json + merges.txt).")


def _read_pad_token(folder: Path) -> str | None:
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        path = folder / name
        if path.is_file():
            pad = json.loads(path.read_text(encoding="utf-8")).get("pad_token")
            if isinstance(pad, dict):  # serialised AddedToken
                pad = pad.get("content")
            if pad:
                return pad
    return None


class CLIPTokenizer:
    """prompts -> (B, 77) ids for CLIP's text encoder.

    ``tok = CLIPTokenizer.default(pad_token="!")``; ``ids = tok(["a photo of a cat", ""])``.
    """

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], pad_token: str = EOS,
                 max_length: int = MAX_LENGTH):
        for token in (BOS, EOS, pad_token):
            if token not in vocab:
                raise ValueError(f"token {token!r} is not in the vocabulary ({len(vocab)} tokens)")
        self.vocab, self.merges = dict(vocab), [tuple(m) for m in merges]
        self.pad_token, self.max_length = pad_token, max_length
        self.bos_id, self.eos_id, self.pad_id = vocab[BOS], vocab[EOS], vocab[pad_token]

        tok = Tokenizer(BPE(vocab=self.vocab, merges=self.merges, continuing_subword_prefix="",
                            end_of_word_suffix="</w>", fuse_unk=False, unk_token=EOS))
        tok.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_PRETOKENIZE), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
        # As in transformers: special tokens written literally in a prompt are their special ids.
        # That includes the pad token, so with SD 2's pad "!" every "!" in a prompt is id 0 ("hi!!!"
        # -> hi, !, !, !) where OpenCLIP's tokenizer, used to train SD 2, has "!!!</w>" = 995. We
        # follow transformers, i.e. what diffusers' SD 2 pipelines feed the text encoder.
        tok.add_special_tokens([AddedToken(t, special=True) for t in dict.fromkeys([BOS, EOS, pad_token])])
        self._tok = tok

    # --- construction -------------------------------------------------------------------------
    @classmethod
    def from_bpe_file(cls, path: str | os.PathLike, pad_token: str = EOS) -> "CLIPTokenizer":
        """From OpenAI's ``bpe_simple_vocab_16e6.txt.gz``."""
        vocab, merges = vocab_and_merges_from_bpe_file(path)
        return cls(vocab, merges, pad_token)

    @classmethod
    def default(cls, pad_token: str = EOS) -> "CLIPTokenizer":
        """The vocabulary inside the installed ``clip`` package (``pip install --no-deps clip-anytorch``)."""
        return cls.from_bpe_file(default_bpe_path(), pad_token)

    @classmethod
    def default_or_missing(cls, pad_token: str = EOS) -> "CLIPTokenizer | MissingTokenizer":
        """:meth:`default`, or, where no vocabulary is installed (e.g. a bare GPU box), a
        :class:`MissingTokenizer` and a warning: the model still builds and runs on ids or
        embeddings, and tokenizing raises the reason."""
        try:
            return cls.default(pad_token)
        except FileNotFoundError as e:
            warnings.warn(f"{e} The model is built without a tokenizer; tokenizing will raise.", stacklevel=3)
            return MissingTokenizer(str(e), pad_token)

    @classmethod
    def from_folder(cls, path: str | os.PathLike, pad_token: str | None = None) -> "CLIPTokenizer":
        """From a diffusers ``tokenizer/`` folder: vocab.json + merges.txt, or only tokenizer.json
        (what transformers >= 5 ``save_pretrained`` writes; vocab and merges are inside). The pad
        token comes from ``pad_token``, else special_tokens_map.json / tokenizer_config.json, else
        ``<|endoftext|>``."""
        folder = Path(path)
        pad = pad_token or _read_pad_token(folder) or EOS
        if not (folder / "vocab.json").is_file() and (folder / "tokenizer.json").is_file():
            model = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8")).get("model", {})
            if model.get("type") != "BPE" or "vocab" not in model or "merges" not in model:
                raise ValueError(f"{folder / 'tokenizer.json'}: not a BPE (CLIP) tokenizer "
                                 f"(model type {model.get('type')!r})")
            merges = [tuple(m.split(" ") if isinstance(m, str) else m) for m in model["merges"]]
            return cls(model["vocab"], merges, pad)
        missing = [n for n in ("vocab.json", "merges.txt") if not (folder / n).is_file()]
        if missing:
            raise FileNotFoundError(f"{folder} is not a CLIP tokenizer folder: missing {', '.join(missing)} "
                                    "(and no tokenizer.json)")
        vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
        lines = (folder / "merges.txt").read_text(encoding="utf-8").split("\n")
        merges = [tuple(line.split()) for line in lines if line and not line.startswith("#version")]
        return cls(vocab, merges, pad)

    def save(self, folder: str | os.PathLike) -> None:
        """Write vocab.json, merges.txt, special_tokens_map.json and tokenizer_config.json, the files
        of a diffusers ``tokenizer/`` folder that ``transformers.CLIPTokenizer`` reads."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "vocab.json").write_text(json.dumps(self.vocab, ensure_ascii=False), encoding="utf-8")
        (folder / "merges.txt").write_text(
            "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in self.merges), encoding="utf-8")
        special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": self.pad_token}
        (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2), encoding="utf-8")
        config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": self.max_length,
                  "do_lower_case": True, "errors": "replace", "add_prefix_space": False, **special}
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")

    # --- use ----------------------------------------------------------------------------------
    def tokenize(self, prompt: str) -> list[str]:
        """The BPE tokens of one prompt, without BOS/EOS (for inspection)."""
        return self._tok.encode(prompt, add_special_tokens=False).tokens

    def __call__(self, prompts: list[str] | str, name: str = "prompt") -> torch.Tensor:
        """(B, 77) int64 ids: BOS, tokens (at most 75, truncated with a warning), EOS, padding.
        The warning names the prompt as ``{name} {index}`` with the start of its text, and the
        text that was dropped."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if not all(isinstance(p, str) for p in prompts):
            raise TypeError(f"prompts must be a str or a list of str, got {[type(p).__name__ for p in prompts]}")
        room = self.max_length - 2
        ids = torch.full((len(prompts), self.max_length), self.pad_id, dtype=torch.long)
        for i, enc in enumerate(self._tok.encode_batch(prompts, add_special_tokens=False)):
            tokens = enc.ids
            if len(tokens) > room:
                dropped = prompts[i][enc.offsets[room][0]:]
                warnings.warn(f"{name} {i} ({_snippet(prompts[i])}) is {len(tokens)} tokens long; CLIP takes "
                              f"{room}, so the last {len(tokens) - room} tokens were dropped: "
                              f"{_snippet(dropped)}", stacklevel=2)
                tokens = tokens[:room]
            row = [self.bos_id, *tokens, self.eos_id]
            ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
        return ids

    def __repr__(self) -> str:
        return f"CLIPTokenizer(vocab={len(self.vocab)}, pad_token={self.pad_token!r}, max_length={self.max_length})"


def _snippet(text: str, n: int = 40) -> str:
    """``text`` quoted, cut to about ``n`` characters."""
    return repr(text if len(text) <= n else text[:n - 3] + "...")


class MissingTokenizer:
    """Stands in for a tokenizer whose vocabulary is not installed; every use raises why."""

    def __init__(self, reason: str, pad_token: str = EOS):
        self.reason, self.pad_token = reason, pad_token

    def _raise(self, *args, **kwargs):
        raise FileNotFoundError(self.reason)

    __call__ = tokenize = save = _raise
