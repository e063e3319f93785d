"""CLIP's byte-level BPE tokenizer (Radford et al. 2021), run by the ``tokenizers`` library.

The pipeline is the one ``transformers.CLIPTokenizer`` builds in transformers 5, and
``CLIPTokenizerFast`` in 4.x (so ids match them exactly):

1. normalise: NFC, every run of whitespace -> one space, lowercase;
2. pre-tokenise: CLIP's regex (``<|startoftext|>``, ``<|endoftext|>``, ``'s 't 're 've 'm 'll 'd``,
   runs of letters, single digits, runs of other non-space characters), then byte-level
   (each UTF-8 byte -> one printable unicode character, GPT-2's ``bytes_to_unicode``);
3. BPE with the end-of-word suffix ``</w>`` and 48 894 merges; vocabulary of 49 408 ids:
   256 bytes, 256 bytes + ``</w>``, one id per merge, then ``<|startoftext|>`` = 49406 and
   ``<|endoftext|>`` = 49407 (the highest id, which is how the text encoder finds it).

Every prompt becomes exactly ``max_length`` ids (77, or a folder's ``model_max_length``):
``<|startoftext|>``, at most ``max_length - 2`` content tokens, ``<|endoftext|>``, then padding:
``<|endoftext|>`` for SD 1.x, ``"!"`` (id 0) for SD 2.x.
Longer prompts are truncated with a warning naming the prompt (index and text) and the tokens dropped.
``<|startoftext|>`` and ``<|endoftext|>`` written in a prompt are BOS and EOS in any case
("<|ENDOFTEXT|>" too): OpenAI's tokenizer lower-cases the prompt before it looks for them, and
transformers 4.x's CLIPTokenizer (slow and fast) marks both ``normalized`` whatever the folder says.
A folder whose tokenizer.json or ``added_tokens_decoder`` lists them keeps the flags it gives.
transformers 5 marks them normalized only where a folder's special-token entries say so, and lets a
plain-string pad token "<|endoftext|>" clear EOS's flag, so it matches "<|ENDOFTEXT|>" as BPE pieces
in a bare vocab.json + merges.txt folder and in the hub's SD 1.5 one; :meth:`CLIPTokenizer.save`
writes the flags, so transformers 4.x and 5 read a saved folder as sdcore does.
As in transformers, the pad token is a special token, so with SD 2's "!" every "!" in a prompt
becomes id 0 (diffusers' behaviour; OpenCLIP's own tokenizer would merge "!!!" into one token).

Added tokens (``tokenizer.add_tokens([...])``, e.g. textual inversion) keep their ids and flags
(``normalized``, ``lstrip``, ``rstrip``, ``single_word``, ``special``). A ``normalized`` one is matched
in the normalised (lower-cased) prompt, so "<CAT-TOY>" is the added "<cat-toy>": that is
``tokenizers``' rule, which transformers 5 (one CLIPTokenizer) and 4.x's CLIPTokenizerFast follow.
4.x's slow Python CLIPTokenizer matches added tokens case-sensitively instead ("<CAT-TOY>" -> BPE
pieces); both agree on a prompt that spells the token as it was added.

transformers 4.x's slow Python ``CLIPTokenizer`` (the class a diffusers folder names, and the one
SD 1's original code, LDM's FrozenCLIPEmbedder, used) cleans text another way, so prompts outside
plain text get other ids there: each CJK ideograph is a word of its own; control and format
characters (NUL, zero-width space and joiner, so emoji ZWJ sequences, BOM, soft hyphen, bidi marks,
private-use) are deleted, where here they are bytes; and with ftfy installed, HTML entities, curly
apostrophes, full-width text and ligatures are normalised first. ASCII prompts, accents, combining
marks, emoji without ZWJ, the 77-token cut and the weighting syntax people type ("(cat:1.2)") agree
with it.
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
# transformers writes model_max_length = int(1e30) (VERY_LARGE_INTEGER) for "no limit known"; any
# value from its LARGE_INTEGER = int(1e20) up is such a placeholder, not a context length.
_UNSET_LENGTH = int(1e20)
_FLAGS = ("single_word", "lstrip", "rstrip", "normalized", "special")  # AddedToken's, as transformers saves them
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


def read_json_object(path: Path, error: type[ValueError] = ValueError, what: str = "") -> dict:
    """A JSON file's top-level object (every tokenizer, config and shard-index file sdcore reads is
    one); else ``error`` naming the file (sdcore.checkpoint passes CheckpointError), ``what`` saying
    what the object should have held."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as e:
        raise error(f"{path}: not a readable JSON file: {e}") from e
    except RecursionError:
        raise error(f"{path}: not a readable JSON file: nested too deeply") from None
    if not isinstance(raw, dict):
        raise error(f"{path}: holds a JSON {type(raw).__name__}, not an object{' ' + what if what else ''}")
    return raw


def _read_pad_token(folder: Path) -> str | None:
    """The pad token as transformers reads it: a tokenizer_config.json with ``added_tokens_decoder``
    (what transformers >= 4.34 and sdcore write) is whole, and its ``pad_token`` (or none) wins;
    only a legacy config without it lets special_tokens_map.json's override it."""
    config_path = folder / "tokenizer_config.json"
    config = read_json_object(config_path) if config_path.is_file() else {}
    sources = [config]
    map_path = folder / "special_tokens_map.json"
    if "added_tokens_decoder" not in config and map_path.is_file():
        sources.insert(0, read_json_object(map_path))
    for source in sources:
        pad = source.get("pad_token")
        if isinstance(pad, dict):  # serialised AddedToken
            pad = pad.get("content")
        if pad:
            return pad
    return None


def _read_max_length(folder: Path) -> int | None:
    """tokenizer_config.json's ``model_max_length``; None where absent or transformers' "no limit"."""
    path = folder / "tokenizer_config.json"
    if not path.is_file():
        return None
    value = read_json_object(path).get("model_max_length")
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # 1e30 written as a float
    if isinstance(value, bool) or not isinstance(value, int) or value < 3:
        raise ValueError(f"{path}: model_max_length must be an integer >= 3 (BOS, a token, EOS), got {value!r}")
    return None if value >= _UNSET_LENGTH else value


def _read_added_tokens(folder: Path) -> dict[int, dict]:
    """id -> {"content", *_FLAGS} of every added token, from all the places transformers writes them:
    tokenizer.json "added_tokens" (transformers >= 5, and 4.x's fast tokenizers),
    tokenizer_config.json "added_tokens_decoder" (4.x >= 4.34), added_tokens.json (4.x, content -> id
    only: flags as 4.x gives them on load, special for ``additional_special_tokens``). A token named
    twice must have one id and an id one token."""
    found: dict[int, tuple[dict, Path]] = {}

    def add(tid, token, path: Path):
        if isinstance(tid, str) and tid.isdigit():
            tid = int(tid)
        content = token.get("content") if isinstance(token, dict) else None
        if isinstance(tid, bool) or not isinstance(tid, int) or tid < 0 or not isinstance(content, str) or not content:
            raise ValueError(f"{path}: added token {token!r} with id {tid!r}: needs a non-empty content and an id >= 0")
        if tid in found and found[tid][0]["content"] != content:
            raise ValueError(f"added token id {tid} is {found[tid][0]['content']!r} in {found[tid][1]} but "
                             f"{content!r} in {path}")
        if tid not in found:  # the first file read wins for the flags (tokenizer.json, then the config)
            special = bool(token.get("special", False))
            defaults = {"normalized": not special, "special": special}  # AddedToken's defaults
            found[tid] = ({"content": content, **{f: bool(token.get(f, defaults.get(f, False))) for f in _FLAGS}},
                          path)

    path = folder / "tokenizer.json"
    if path.is_file():
        for token in read_json_object(path).get("added_tokens") or []:
            add(token.get("id") if isinstance(token, dict) else None, token, path)
    path = folder / "tokenizer_config.json"
    if path.is_file():
        for tid, token in (read_json_object(path).get("added_tokens_decoder") or {}).items():
            add(tid, token, path)
    path = folder / "added_tokens.json"
    if path.is_file():
        extra = (read_json_object(folder / "special_tokens_map.json") if (folder / "special_tokens_map.json").is_file()
                 else {}).get("additional_special_tokens") or []
        extra = {t.get("content") if isinstance(t, dict) else t for t in extra}
        for content, tid in read_json_object(path).items():
            add(tid, {"content": content, "normalized": content not in extra, "special": content in extra}, path)
    by_content: dict[str, int] = {}
    for tid, (token, path) in sorted(found.items()):
        if token["content"] in by_content:
            raise ValueError(f"{path}: added token {token['content']!r} has two ids, "
                             f"{by_content[token['content']]} and {tid}")
        by_content[token["content"]] = tid
    return {tid: token for tid, (token, _) in sorted(found.items())}


class CLIPTokenizer:
    """prompts -> (B, max_length) ids for CLIP's text encoder (max_length 77 unless given).

    ``tok = CLIPTokenizer.default(pad_token="!")``; ``ids = tok(["a photo of a cat", ""])``.
    ``added_tokens``: id -> ``{"content": ..., "normalized": ..., "special": ..., ...}`` (the
    ``added_tokens_decoder`` entries transformers saves), beyond or within the BPE vocabulary.
    """

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], pad_token: str = EOS,
                 max_length: int = MAX_LENGTH, added_tokens: dict[int, dict] | None = None):
        added = {int(i): {"content": t["content"], **{f: bool(t.get(f, False)) for f in _FLAGS}}
                 for i, t in (added_tokens or {}).items()}
        by_id = {i: t for t, i in vocab.items()}
        for tid, token in added.items():
            content = token["content"]
            if content in vocab and vocab[content] != tid:
                raise ValueError(f"added token {content!r} has id {tid}, but the vocabulary gives it {vocab[content]}")
            if tid in by_id and by_id[tid] != content:
                raise ValueError(f"added token {content!r} has id {tid}, which is the vocabulary's {by_id[tid]!r}")
        known = {**vocab, **{t["content"]: i for i, t in added.items()}}
        for token in (BOS, EOS, pad_token):
            if token not in known:
                raise ValueError(f"token {token!r} is not in the vocabulary ({len(known)} tokens)")
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 3:
            raise ValueError(f"max_length must be an integer >= 3 (BOS, a token, EOS), got {max_length!r}")
        self.vocab, self.merges = dict(vocab), [tuple(m) for m in merges]
        self.added_tokens = {i: added[i] for i in sorted(added)}
        self.pad_token, self.max_length = pad_token, max_length
        self.bos_id, self.eos_id, self.pad_id = known[BOS], known[EOS], known[pad_token]
        self.max_id = max(known.values())  # the text encoder needs an embedding row for each id up to it

        # Added tokens go into the BPE vocabulary too: `tokenizers` then gives them their saved ids
        # (it numbers tokens that are not in the model's vocabulary itself). BPE never produces them:
        # no merge leads to them.
        tok = Tokenizer(BPE(vocab=known, merges=self.merges, continuing_subword_prefix="",
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
        tok.add_tokens([AddedToken(t["content"], **{f: t[f] for f in _FLAGS}) for t in self.added_tokens.values()])
        listed = {t["content"] for t in self.added_tokens.values()}
        tok.add_special_tokens([AddedToken(t, **self._special_flags(t)) for t in dict.fromkeys([BOS, EOS, pad_token])
                                if t not in listed])
        wrong = [(t["content"], i, tok.token_to_id(t["content"])) for i, t in self.added_tokens.items()
                 if tok.token_to_id(t["content"]) != i]
        if wrong:  # a change in `tokenizers`' numbering, not the caller's input
            raise AssertionError(f"added tokens got other ids than saved (content, saved, got): {wrong[:5]}")
        self._tok = tok

    @staticmethod
    def _special_flags(token: str) -> dict:
        """A special token's flags where no added token lists it. BOS and EOS are matched in the
        normalised (lower-cased) prompt, so "<|ENDOFTEXT|>" is EOS: OpenAI's tokenizer lower-cases
        before it looks for them, and transformers 4.x's CLIPTokenizer (slow and fast) marks both
        ``normalized`` whatever the folder says. Another pad token ("!") is matched as written."""
        return {"special": True, "normalized": token in (BOS, EOS), "lstrip": False, "rstrip": False,
                "single_word": False}

    # --- construction -------------------------------------------------------------------------
    @classmethod
    def from_bpe_file(cls, path: str | os.PathLike, pad_token: str = EOS,
                      max_length: int = MAX_LENGTH) -> "CLIPTokenizer":
        """From OpenAI's ``bpe_simple_vocab_16e6.txt.gz``."""
        vocab, merges = vocab_and_merges_from_bpe_file(path)
        return cls(vocab, merges, pad_token, max_length)

    @classmethod
    def default(cls, pad_token: str = EOS, max_length: int = MAX_LENGTH) -> "CLIPTokenizer":
        """The vocabulary inside the installed ``clip`` package (``pip install --no-deps clip-anytorch``)."""
        return cls.from_bpe_file(default_bpe_path(), pad_token, max_length)

    @classmethod
    def default_or_missing(cls, pad_token: str = EOS,
                           max_length: int = MAX_LENGTH) -> "CLIPTokenizer | MissingTokenizer":
        """:meth:`default`, or, where no vocabulary is installed (e.g. a bare GPU box), a
        :class:`MissingTokenizer` and a warning: the model still builds and runs on ids or
        embeddings, and tokenizing raises the reason."""
        try:
            return cls.default(pad_token, max_length)
        except FileNotFoundError as e:
            warnings.warn(f"{e} The model is built without a tokenizer; tokenizing will raise.", stacklevel=3)
            return MissingTokenizer(str(e), pad_token, max_length)

    @classmethod
    def from_folder(cls, path: str | os.PathLike, pad_token: str | None = None,
                    default_max_length: int = MAX_LENGTH) -> "CLIPTokenizer":
        """From a diffusers ``tokenizer/`` folder: vocab.json + merges.txt, or only tokenizer.json
        (what transformers >= 5 ``save_pretrained`` writes; vocab and merges are inside), with the
        added tokens of any of tokenizer.json / tokenizer_config.json / added_tokens.json. The pad
        token comes from ``pad_token``, else the folder's as transformers reads it (tokenizer_config.json;
        special_tokens_map.json first only where that config lacks ``added_tokens_decoder``), else
        ``<|endoftext|>``; ``max_length`` from tokenizer_config.json's ``model_max_length``, else
        (absent, or transformers' int(1e30) for "no limit") ``default_max_length``."""
        folder = Path(path)
        pad = pad_token or _read_pad_token(folder) or EOS
        max_length = _read_max_length(folder) or default_max_length
        added = _read_added_tokens(folder)
        if not (folder / "vocab.json").is_file() and (folder / "tokenizer.json").is_file():
            model = read_json_object(folder / "tokenizer.json").get("model", {})
            if model.get("type") != "BPE" or "vocab" not in model or "merges" not in model:
                raise ValueError(f"{folder / 'tokenizer.json'}: not a BPE (CLIP) tokenizer "
                                 f"(model type {model.get('type')!r})")
            merges = [tuple(m.split(" ") if isinstance(m, str) else m) for m in model["merges"]]
            return cls._checked(folder, model["vocab"], merges, pad, max_length, added)
        missing = [n for n in ("vocab.json", "merges.txt") if not (folder / n).is_file()]
        if missing:
            raise FileNotFoundError(f"{folder} is not a CLIP tokenizer folder: missing {', '.join(missing)} "
                                    "(and no tokenizer.json)")
        vocab = read_json_object(folder / "vocab.json")
        lines = (folder / "merges.txt").read_text(encoding="utf-8").split("\n")
        merges = [tuple(line.split()) for line in lines if line and not line.startswith("#version")]
        return cls._checked(folder, vocab, merges, pad, max_length, added)

    @classmethod
    def _checked(cls, folder: Path, *args) -> "CLIPTokenizer":
        try:
            return cls(*args)
        except ValueError as e:
            raise ValueError(f"{folder}: {e}") from e
        except Exception as e:  # the tokenizers library's own (a merges.txt cut short: a plain Exception)
            raise ValueError(f"{folder}: cannot build a BPE tokenizer from its vocabulary and merges "
                             f"(vocab.json and merges.txt, or tokenizer.json): {type(e).__name__}: {e}") from e

    def save(self, folder: str | os.PathLike) -> None:
        """Write vocab.json, merges.txt, special_tokens_map.json and tokenizer_config.json (its
        ``added_tokens_decoder``), plus added_tokens.json when there are added tokens: the files of a
        diffusers ``tokenizer/`` folder that ``transformers.CLIPTokenizer`` (4.x and 5) reads."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "vocab.json").write_text(json.dumps(self.vocab, ensure_ascii=False), encoding="utf-8")
        (folder / "merges.txt").write_text(
            "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in self.merges), encoding="utf-8")
        # the special tokens' flags go in added_tokens_decoder, which transformers 4.x (>= 4.34) and 5
        # read; from the plain strings alone transformers 5 would mark BOS and EOS normalized=False
        listed = {t["content"]: t for t in self.added_tokens.values()}
        flags = {t: listed.get(t) or {"content": t, **self._special_flags(t)} for t in (BOS, EOS, self.pad_token)}
        special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": self.pad_token}
        (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2), encoding="utf-8")
        config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": self.max_length,
                  "do_lower_case": True, "errors": "replace", "add_prefix_space": False, **special}
        beyond = {t["content"]: i for i, t in self.added_tokens.items() if t["content"] not in self.vocab}
        decoder = {self.bos_id: flags[BOS], self.eos_id: flags[EOS], self.pad_id: flags[self.pad_token],
                   **self.added_tokens}
        config["added_tokens_decoder"] = {str(i): t for i, t in sorted(decoder.items())}
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False),
                                                      encoding="utf-8")
        added_json = folder / "added_tokens.json"
        if beyond:
            added_json.write_text(json.dumps(beyond, indent=2, ensure_ascii=False), encoding="utf-8")
        else:
            added_json.unlink(missing_ok=True)  # a stale one would add tokens this tokenizer lacks
        # a stale tokenizer.json (transformers 5 writes only that) would be read before these files,
        # by transformers and for its added tokens by from_folder: another tokenizer than this one
        (folder / "tokenizer.json").unlink(missing_ok=True)

    # --- use ----------------------------------------------------------------------------------
    def tokenize(self, prompt: str) -> list[str]:
        """The BPE tokens of one prompt, without BOS/EOS (for inspection)."""
        return self._tok.encode(prompt, add_special_tokens=False).tokens

    def __call__(self, prompts: list[str] | str, name: str = "prompt") -> torch.Tensor:
        """(B, max_length) int64 ids: BOS, tokens (at most max_length - 2, truncated with a warning),
        EOS, padding.
        The warning names the prompt as ``{name} {index}`` with the start of its text, and the
        text that was dropped."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if not all(isinstance(p, str) for p in prompts):
            raise TypeError(f"prompts must be a str or a list of str, got {[type(p).__name__ for p in prompts]}")
        for i, p in enumerate(prompts):  # tokenizers' own error named neither the prompt nor the character
            try:
                p.encode("utf-8")
            except UnicodeEncodeError as e:
                c = ord(p[e.start])
                if 0xDC80 <= c <= 0xDCFF:  # Python's surrogateescape: a byte of a command line that is not UTF-8
                    raise ValueError(f"{name} {i} ({_snippet(p)}) holds the byte 0x{c - 0xDC00:02x} at {e.start}, "
                                     "which is not UTF-8 (text from a command line or file in another encoding, "
                                     "e.g. Latin-1: write it in UTF-8)") from None
                raise ValueError(f"{name} {i} ({_snippet(p)}) holds {p[e.start]!r} at {e.start}, a UTF-16 surrogate, "
                                 "which is no character and has no UTF-8 bytes to tokenize (a pair split in two: "
                                 "s.encode('utf-16', 'surrogatepass').decode('utf-16') joins it)") from None
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
        n = sum(t["content"] not in self.vocab for t in self.added_tokens.values())
        added = f", added_tokens={n}" if n else ""
        return (f"CLIPTokenizer(vocab={len(self.vocab)}{added}, pad_token={self.pad_token!r}, "
                f"max_length={self.max_length})")


def _snippet(text: str, n: int = 40) -> str:
    """``text`` quoted, cut to about ``n`` characters."""
    return repr(text if len(text) <= n else text[:n - 3] + "...")


class MissingTokenizer:
    """Stands in for a tokenizer whose vocabulary is not installed; every use raises why."""

    def __init__(self, reason: str, pad_token: str = EOS, max_length: int = MAX_LENGTH):
        self.reason, self.pad_token, self.max_length = reason, pad_token, max_length

    def _raise(self, *args, **kwargs):
        raise FileNotFoundError(self.reason)

    __call__ = tokenize = save = _raise
