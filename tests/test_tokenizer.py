"""sdcore.tokenizer against transformers' CLIPTokenizer on the real CLIP vocabulary."""
from __future__ import annotations

import gzip
import json
import random
import warnings

import pytest
import torch
import transformers
from tokenizers import AddedToken

from sdcore import tokenizer as tk
from sdcore.tokenizer import CLIPTokenizer

PADS = ["<|endoftext|>", "!"]  # SD 1.x pads with EOS, SD 2.x with "!" (id 0)


@pytest.fixture(scope="module")
def bpe_path():
    try:
        return tk.default_bpe_path()
    except FileNotFoundError as e:  # a missing vocabulary is a broken environment, not a skip
        pytest.fail(f"{e}\nThese tests need it: pip install --no-deps clip-anytorch")


@pytest.fixture(scope="module")
def hf_folder(bpe_path, tmp_path_factory):
    """vocab.json + merges.txt written from the .gz the way OpenAI's SimpleTokenizer builds them,
    independently of sdcore.tokenizer, for transformers to read."""
    lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")
    merges = lines[1:49152 - 256 - 2 + 1]
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    cs = bs[:] + [256 + n for n in range(256 - len(bs))]
    bs += [b for b in range(256) if b not in bs]
    byte_chars = [chr(c) for _, c in zip(bs, cs)]
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    folder = tmp_path_factory.mktemp("hf_clip_tokenizer")
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return folder


def _hf_ids(folder, prompts, pad):
    hf = transformers.CLIPTokenizer.from_pretrained(folder, pad_token=pad)
    return hf(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids


HAND_WRITTEN = [
    "",  # empty prompt: BOS, EOS, padding
    " ", "\t\n  ", "a photo of a cat",
    "A PHOTO OF A CAT", "a Photo Of A cAt",
    "   leading and trailing   whitespace   ", "tabs\tand\nnewlines\r\nhere",
    "masterpiece, best quality, (ultra-detailed:1.2), [blurry], {castle}",
    "hello!!! what?? yes... no;; 'quoted' \"double\" `tick`",
    "it's, they're, we've, I'm, you'll, he'd, don't, IT'S, WE'LL",
    "numbers 0 1 12 123 3.14159 1,000,000 2023-11-05 4k 8K 16:9 1girl",
    "café, naïve, résumé, Ångström, São Paulo, Zürich, façade",
    "e\u0301te\u0301 (decomposed accents, NFC composes them)",
    "東京の夜景, 北京, 서울의 밤, ภาษาไทย, Москва, Ελλάδα, עברית, العربية",
    "emoji 🐱🐶🚀✨ and flags 🇫🇷🇯🇵 and family 👨‍👩‍👧 and skin 👍🏽",
    "math ∑∫√∞ ≤ ≥ ≠ ± × ÷ and symbols © ® ™ § ¶ € £ ¥",
    "url https://example.com/path?q=1&r=2#frag and mail a.b@c.org",
    "under_score snake_case CamelCase kebab-case dot.case slash/case",
    "a" * 200,  # one very long word
    "cat " * 100,  # far over 75 tokens: truncated
    ", ".join(f"detail {i}" for i in range(60)),  # long, mixed digits and punctuation
    "zero\u200bwidth\u200bspace and non\u00a0breaking\u00a0space",
    "<|startoftext|> literal markers <|endoftext|> in the prompt",
    "ALL CAPS SHOUTING WITH ÉCLAIR ÜBER",
    "ß straße STRASSE ﬁ ligature",
    "x" * 76, " ".join(["word"] * 74), " ".join(["word"] * 75), " ".join(["word"] * 76),  # around the limit
    "🙂" * 40,  # multi-byte characters that BPE splits into bytes
    "(((best quality))), <lora:foo:0.8>, [[worst quality]]",
    "a painting of a fox in the style of Hokusai, trending on artstation, 8k uhd, octane render",
]

_WORDS = ("photo portrait landscape castle dragon astronaut horse cyberpunk city night neon rain "
          "oil painting watercolor sketch detailed cinematic lighting golden hour volumetric fog "
          "forest mountain river ocean sunset sunrise cat dog robot warrior princess wizard "
          "highly intricate sharp focus bokeh hdr studio anime realistic surreal baroque").split()
_EXTRA = ["!", "?", ",", ".", ";", ":", "-", "'s", "(", ")", "[", "]", "...", "&", "#", "%", "42", "3.5",
          "1024x768", "café", "über", "東京", "猫", "🐱", "🎨", "ñ", "Ω", "  ", "\t", "UPPER", "MiXeD"]


def corpus(n_generated: int = 200) -> list[str]:
    rng = random.Random(20240611)
    prompts = []
    for _ in range(n_generated):
        parts = [rng.choice(_WORDS) if rng.random() < 0.75 else rng.choice(_EXTRA)
                 for _ in range(rng.choice([1, 2, 3, 5, 8, 13, 21, 40, 90]))]
        sep = rng.choice([" ", ", ", " ", "  ", ","])
        text = sep.join(parts)
        prompts.append(text.upper() if rng.random() < 0.1 else text)
    return HAND_WRITTEN + prompts


@pytest.mark.parametrize("pad", PADS)
def test_ids_match_transformers(bpe_path, hf_folder, pad):
    prompts = corpus()
    assert len(prompts) >= 200
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # long prompts warn; tested below
        ours = CLIPTokenizer.from_bpe_file(bpe_path, pad_token=pad)(prompts)
    theirs = _hf_ids(hf_folder, prompts, pad)
    assert ours.dtype == torch.long and ours.shape == (len(prompts), 77)
    bad = [i for i in range(len(prompts)) if not torch.equal(ours[i], theirs[i])]
    assert not bad, (f"{len(bad)} of {len(prompts)} prompts differ (pad {pad!r}); first: "
                     f"#{bad[0]} {prompts[bad[0]]!r}\n ours   {ours[bad[0]].tolist()}\n theirs {theirs[bad[0]].tolist()}")


def test_vocabulary_layout(bpe_path):
    tok = CLIPTokenizer.from_bpe_file(bpe_path, pad_token="!")
    assert len(tok.vocab) == 49408 and len(tok.merges) == 48894
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (49406, 49407, 0)
    assert CLIPTokenizer.default().pad_id == 49407
    ids = tok("a photo of a cat")[0]
    assert ids[0] == 49406 and ids.tolist().index(49407) == 6 and (ids[7:] == 0).all(), ids.tolist()


def test_truncation_warns_with_prompt_and_count(bpe_path):
    tok = CLIPTokenizer.from_bpe_file(bpe_path)
    with pytest.warns(UserWarning, match=r"prompt 1 \('cat cat .*\.\.\.'\) is 100 tokens long.*last 25 tokens were dropped"):
        ids = tok(["short", "cat " * 100])
    assert ids[1, 0] == 49406 and ids[1, -1] == 49407 and (ids[1, 1:-1] == ids[1, 1]).all(), ids[1].tolist()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # exactly 75 tokens fit: no warning
        tok(" ".join(["word"] * 75))


def test_truncation_warning_quotes_the_prompt_and_the_dropped_text(bpe_path):
    """The start of the prompt (to find it) and the text that was cut, under the caller's name."""
    tok = CLIPTokenizer.from_bpe_file(bpe_path)
    prompt = "A photo of " + "a cat, " * 40 + "in the style of Monet"
    with pytest.warns(UserWarning) as caught:
        tok(["ok", prompt], name="negative_prompt")
    assert [str(w.message) for w in caught] == [
        "negative_prompt 1 ('A photo of a cat, a cat, a cat, a cat...') is 128 tokens long; CLIP takes 75, "
        "so the last 53 tokens were dropped: 'a cat, a cat, a cat, a cat, a cat, a ...'"]
    with pytest.warns(UserWarning, match=r"^prompt 0 \('y y y .*last 2 tokens were dropped: 'z z'$"):
        tok(" ".join(["y"] * 75) + " z z")  # only the two last tokens go


@pytest.mark.parametrize("pad", PADS)
def test_save_from_folder_round_trip(bpe_path, tmp_path, pad):
    tok = CLIPTokenizer.from_bpe_file(bpe_path, pad_token=pad)
    tok.save(tmp_path)
    again = CLIPTokenizer.from_folder(tmp_path)
    assert again.pad_token == pad and again.vocab == tok.vocab and again.merges == tok.merges
    prompts = corpus(40)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert torch.equal(again(prompts), tok(prompts))
        # transformers reads the saved folder, pad token included
        hf = transformers.CLIPTokenizer.from_pretrained(tmp_path)
        assert hf.pad_token == pad
        theirs = hf(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        assert torch.equal(theirs, tok(prompts))


@pytest.mark.parametrize("decoder", [True, False], ids=["added_tokens_decoder", "legacy-config"])
@pytest.mark.parametrize("in_map, in_config", [("!", tk.EOS), (tk.EOS, "!"), ("!", None)])
def test_pad_token_read_as_transformers_reads_it(bpe_path, tmp_path, decoder, in_map, in_config):
    """A tokenizer_config.json with added_tokens_decoder (transformers >= 4.34, and our save()) is
    read alone: special_tokens_map.json's pad token counts only beside a legacy config. Folders
    whose two files disagree pad as transformers pads them."""
    CLIPTokenizer.from_bpe_file(bpe_path).save(tmp_path)
    special = json.loads((tmp_path / "special_tokens_map.json").read_text())
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert "added_tokens_decoder" in config  # what save() writes
    special["pad_token"] = in_map
    config.pop("pad_token", None)
    if in_config is not None:
        config["pad_token"] = in_config
    if not decoder:
        config.pop("added_tokens_decoder")
    (tmp_path / "special_tokens_map.json").write_text(json.dumps(special))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    hf = transformers.CLIPTokenizer.from_pretrained(tmp_path)
    ours = CLIPTokenizer.from_folder(tmp_path)
    assert ours.pad_token == hf.pad_token, (ours.pad_token, hf.pad_token)
    want = hf(["a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert torch.equal(ours(["a cat"]), want), (ours(["a cat"])[0, :6], want[0, :6])


MARKER_PROMPTS = ["<|ENDOFTEXT|> a", "a <|StartOfText|> b", "x<|EndOfText|>y", "<|startoftext|><|ENDOFTEXT|>!",
                  "<|endoftext|>"]


def _hub_folder(hf_folder, folder, pad):
    """A tokenizer folder as the hub's SD 1.5 and 2.1 ones are written (transformers 4.x before
    4.34): vocab.json, merges.txt, and BOS/EOS/UNK as serialised AddedTokens marked normalized."""
    folder.mkdir()
    for name in ("vocab.json", "merges.txt"):
        (folder / name).write_bytes((hf_folder / name).read_bytes())
    def added(token):
        return {"__type": "AddedToken", "content": token, "lstrip": False, "normalized": True, "rstrip": False,
                "single_word": False}
    special = {"bos_token": added(tk.BOS), "eos_token": added(tk.EOS), "unk_token": added(tk.EOS), "pad_token": pad}
    (folder / "special_tokens_map.json").write_text(json.dumps(special))
    (folder / "tokenizer_config.json").write_text(json.dumps({**special, "model_max_length": 77, "do_lower_case": True,
                                                              "tokenizer_class": "CLIPTokenizer"}))
    return folder


@pytest.mark.parametrize("pad", PADS)
def test_bos_and_eos_are_found_in_any_case(bpe_path, hf_folder, tmp_path, pad):
    """OpenAI's tokenizer lower-cases a prompt before it looks for <|startoftext|> and <|endoftext|>,
    and transformers 4.x's CLIPTokenizer marks both normalized, so "<|ENDOFTEXT|>" is EOS: in the
    default tokenizer, in a hub-style folder, and in a folder we save, which transformers reads the
    same. The oracle is transformers 5 told that both are normalized."""
    flags = dict(lstrip=False, rstrip=False, single_word=False, normalized=True, special=True)
    bos, eos = AddedToken(tk.BOS, **flags), AddedToken(tk.EOS, **flags)
    hf = transformers.CLIPTokenizer.from_pretrained(hf_folder, bos_token=bos, eos_token=eos, unk_token=eos,
                                                    pad_token=eos if pad == tk.EOS else pad)
    want = hf(MARKER_PROMPTS, padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert want[0, :4].tolist() == [49406, 49407, 320, 49407], want[0, :4]  # the oracle itself
    default = CLIPTokenizer.from_bpe_file(bpe_path, pad_token=pad)
    hub = CLIPTokenizer.from_folder(_hub_folder(hf_folder, tmp_path / "hub", pad))
    default.save(tmp_path / "saved")
    saved = transformers.CLIPTokenizer.from_pretrained(tmp_path / "saved")
    for name, ids in [("default", default(MARKER_PROMPTS)), ("hub folder", hub(MARKER_PROMPTS)),
                      ("saved, read by transformers", saved(MARKER_PROMPTS, padding="max_length", max_length=77,
                                                            return_tensors="pt").input_ids)]:
        bad = [i for i in range(len(MARKER_PROMPTS)) if not torch.equal(ids[i], want[i])]
        assert not bad, (f"{name}: {MARKER_PROMPTS[bad[0]]!r}\n got  {ids[bad[0], :8].tolist()}\n want "
                         f"{want[bad[0], :8].tolist()}")


def test_bad_inputs(tmp_path, monkeypatch, bpe_path):
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        CLIPTokenizer.from_folder(tmp_path)
    with pytest.raises(ValueError, match="not in the vocabulary"):
        CLIPTokenizer.from_bpe_file(bpe_path, pad_token="<pad>")
    with pytest.raises(TypeError, match="list of str"):
        CLIPTokenizer.from_bpe_file(bpe_path)(["ok", 3])
    # a lone surrogate (no UTF-8 bytes): tokenizers' TypeError named neither the prompt nor the character
    with pytest.raises(ValueError, match=r"negative_prompt 1 \('a\\ud800b'\) holds '\\ud800' at 1, a UTF-16 surrogate"):
        CLIPTokenizer.from_bpe_file(bpe_path)(["ok", "a\ud800b"], name="negative_prompt")
    monkeypatch.setattr(tk.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps clip-anytorch"):
        CLIPTokenizer.default()


@pytest.mark.parametrize("pad", PADS)
def test_from_folder_with_only_tokenizer_json(hf_folder, tmp_path, pad):
    """transformers >= 5 `save_pretrained` writes tokenizer.json (vocab and merges inside) and no
    vocab.json/merges.txt, so that is what a diffusers folder saved today holds."""
    hf = transformers.CLIPTokenizer.from_pretrained(hf_folder, pad_token=pad)
    hf.save_pretrained(tmp_path)
    for legacy in ("vocab.json", "merges.txt"):
        (tmp_path / legacy).unlink(missing_ok=True)
    ours = tk.CLIPTokenizer.from_folder(tmp_path)
    assert ours.pad_token == pad
    prompts = corpus(40)
    with pytest.warns(UserWarning, match="tokens long; CLIP takes 75"):  # the corpus has long prompts
        ids = ours(prompts)
    assert torch.equal(ids, _hf_ids(hf_folder, prompts, pad))


def test_from_folder_rejects_a_non_bpe_tokenizer_json(tmp_path):
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "WordPiece", "vocab": {}}}))
    with pytest.raises(ValueError, match="not a BPE .* 'WordPiece'"):
        tk.CLIPTokenizer.from_folder(tmp_path)


def test_model_builds_without_a_vocabulary(monkeypatch):
    """A bare GPU box without clip-anytorch can still build and benchmark a preset; tokenizing
    then raises the install hint instead of the model failing to build."""
    import sdcore

    def missing():
        raise FileNotFoundError("CLIP's vocabulary was not found: pip install --no-deps clip-anytorch.")

    monkeypatch.setattr(tk, "default_bpe_path", missing)
    with pytest.warns(UserWarning, match="built without a tokenizer"):
        sd = sdcore.StableDiffusion.from_preset("tiny")
    assert isinstance(sd.tokenizer, tk.MissingTokenizer) and sd.tokenizer.pad_token == "<|endoftext|>"
    ctx = sd.text_encoder(torch.full((1, 77), 49407))  # the model itself runs on ids
    assert ctx.shape == (1, 77, 32)
    with pytest.raises(FileNotFoundError, match="clip-anytorch"):
        sd.tokenizer(["a cat"])


def test_diffusers_save_without_a_tokenizer_writes_nothing(monkeypatch, tmp_path):
    """A diffusers folder needs its tokenizer: without one, save refuses before writing any
    component (it wrote unet/, vae/, text_encoder/ and scheduler/, then failed at tokenizer/)."""
    import sdcore

    monkeypatch.setattr(tk, "default_bpe_path", lambda: (_ for _ in ()).throw(FileNotFoundError("no vocabulary")))
    with pytest.warns(UserWarning, match="built without a tokenizer"):
        sd = sdcore.StableDiffusion.from_preset("tiny")
    with pytest.raises(FileNotFoundError, match="not written, the model has no tokenizer to save: no vocabulary"):
        sd.save(tmp_path / "folder", layout="diffusers")
    assert not (tmp_path / "folder").exists() or not any((tmp_path / "folder").rglob("*")), \
        sorted((tmp_path / "folder").rglob("*"))


def test_merges_without_a_version_header(bpe_path, tmp_path):
    """Some exporters write merges.txt without the `#version` line: the first merge is kept."""
    tok = CLIPTokenizer.from_bpe_file(bpe_path)
    tok.save(tmp_path)
    merges = tmp_path / "merges.txt"
    text = merges.read_text(encoding="utf-8")
    assert text.startswith("#version")
    merges.write_text(text.split("\n", 1)[1], encoding="utf-8")
    again = CLIPTokenizer.from_folder(tmp_path)
    assert again.merges == tok.merges
    assert torch.equal(again(["a photograph of an astronaut"]), tok(["a photograph of an astronaut"]))


# --- added tokens (textual inversion) and model_max_length, as transformers saves them -------------
ADDED = ["<cat-toy>", "<Dog-Toy>", "xyzzy"]  # normalized (transformers' add_tokens default), one upper-case
ADDED_SPECIAL = ["<sp>"]  # special: matched as written, never lower-cased
ADDED_PROMPTS = ["a photo of <cat-toy>", "a photo of <CAT-TOY> on a beach", "<cat-toy>s x<cat-toy>y",
                 "<dog-toy> <Dog-Toy> <DOG-TOY>", "xyzzy XYZZY xyzzyx", "<sp> <SP> a<sp>b", "  <cat-toy>  ",
                 "<|endoftext|> <cat-toy>!!", "no added token here"]


@pytest.fixture(scope="module")
def hf_added(hf_folder):
    """transformers' CLIPTokenizer with tokens added the textual-inversion way (ids 49408..49411)."""
    hf = transformers.CLIPTokenizer.from_pretrained(hf_folder)
    assert hf.add_tokens(ADDED) == 3 and hf.add_tokens(ADDED_SPECIAL, special_tokens=True) == 1
    return hf


def _flags(token: str, special: bool) -> dict:
    return {"content": token, "lstrip": False, "normalized": not special, "rstrip": False, "single_word": False,
            "special": special}


def _saved_as(layout: str, hf_added, hf_folder, folder):
    """``folder`` holding hf_added in the files one transformers version writes:
    "transformers5": its save_pretrained (tokenizer.json "added_tokens", no vocab.json);
    "transformers4": vocab.json + merges.txt + tokenizer_config.json "added_tokens_decoder" + added_tokens.json
    (what 4.x >= 4.34 writes, BOS/EOS listed with normalized=true as 4.x does);
    "added_tokens.json": vocab.json + merges.txt + added_tokens.json only (4.x before 4.34)."""
    if layout == "transformers5":
        hf_added.save_pretrained(folder)
        assert not (folder / "vocab.json").exists() and not (folder / "added_tokens.json").exists()
        return folder
    folder.mkdir()
    for name in ("vocab.json", "merges.txt"):
        (folder / name).write_bytes((hf_folder / name).read_bytes())
    ids = {t: 49408 + i for i, t in enumerate(ADDED + ADDED_SPECIAL)}
    (folder / "added_tokens.json").write_text(json.dumps(ids))
    special = {"bos_token": tk.BOS, "eos_token": tk.EOS, "unk_token": tk.EOS, "pad_token": tk.EOS}
    if layout == "added_tokens.json":
        special["additional_special_tokens"] = ADDED_SPECIAL
    else:
        decoder = {str(i): _flags(t, t in ADDED_SPECIAL) for t, i in ids.items()}
        decoder.update({"49406": {**_flags(tk.BOS, True), "normalized": True},
                        "49407": {**_flags(tk.EOS, True), "normalized": True}})
        config = {"model_max_length": 77, "added_tokens_decoder": decoder}
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "special_tokens_map.json").write_text(json.dumps(special))
    return folder


@pytest.mark.parametrize("layout", ["transformers5", "transformers4", "added_tokens.json"])
def test_added_tokens_match_transformers(hf_added, hf_folder, tmp_path, layout):
    """Added tokens keep their ids (not BPE pieces) and transformers' matching: a normalized one also
    matches its upper-case spelling (tokenizers' rule: transformers 5, and 4.x's CLIPTokenizerFast; 4.x's
    slow CLIPTokenizer would BPE "<CAT-TOY>"), a special one only as written."""
    folder = _saved_as(layout, hf_added, hf_folder, tmp_path / "tok")
    ours = CLIPTokenizer.from_folder(folder)
    want = hf_added(ADDED_PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    got = ours(ADDED_PROMPTS)
    bad = [i for i in range(len(ADDED_PROMPTS)) if not torch.equal(got[i], want[i])]
    assert not bad, (f"{layout}: {len(bad)} prompts differ; first {ADDED_PROMPTS[bad[0]]!r}\n"
                     f" ours   {got[bad[0], :12].tolist()}\n theirs {want[bad[0], :12].tolist()}")
    assert want[0, :6].tolist() == [49406, 320, 1125, 539, 49408, 49407]  # the oracle itself: one id for the token
    assert ours.max_id == 49411 and "added_tokens=4" in repr(ours), repr(ours)


def test_save_round_trips_added_tokens(hf_added, tmp_path):
    hf_added.save_pretrained(tmp_path / "hf")
    ours = CLIPTokenizer.from_folder(tmp_path / "hf")
    ours.save(tmp_path / "ours")
    want = hf_added(ADDED_PROMPTS, padding="max_length", max_length=77, return_tensors="pt").input_ids
    again = CLIPTokenizer.from_folder(tmp_path / "ours")
    assert again.added_tokens == ours.added_tokens and torch.equal(again(ADDED_PROMPTS), want)
    theirs = transformers.CLIPTokenizer.from_pretrained(tmp_path / "ours")  # transformers reads what we write
    assert torch.equal(theirs(ADDED_PROMPTS, padding="max_length", max_length=77, return_tensors="pt").input_ids, want)
    assert json.loads((tmp_path / "ours" / "added_tokens.json").read_text()) == {
        t: 49408 + i for i, t in enumerate(ADDED + ADDED_SPECIAL)}


def test_conflicting_added_tokens_are_refused(hf_added, hf_folder, tmp_path):
    folder = _saved_as("transformers4", hf_added, hf_folder, tmp_path / "tok")
    (folder / "added_tokens.json").write_text(json.dumps({"<other>": 49408}))
    with pytest.raises(ValueError, match=r"added token id 49408 is '<cat-toy>' in .*tokenizer_config\.json but "
                                         r"'<other>' in .*added_tokens\.json"):
        CLIPTokenizer.from_folder(folder)
    (folder / "added_tokens.json").write_text(json.dumps({"a</w>": 49500}))  # a BPE token under another id
    with pytest.raises(ValueError, match=r"added token 'a</w>' has id 49500, but the vocabulary gives it 320"):
        CLIPTokenizer.from_folder(folder)


@pytest.mark.parametrize("value, want", [
    (64, 64),  # a text encoder with 64 positions
    (int(1e30), 77),  # transformers' "no limit" placeholder (VERY_LARGE_INTEGER): the default
    (1e30, 77),  # the same written as a float
    (None, 77),
])
def test_model_max_length_from_tokenizer_config(bpe_path, tmp_path, value, want):
    CLIPTokenizer.from_bpe_file(bpe_path).save(tmp_path)
    path = tmp_path / "tokenizer_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "model_max_length": value}))
    ours = CLIPTokenizer.from_folder(tmp_path)
    assert ours.max_length == want and ours(["a cat", ""]).shape == (2, want), repr(ours)
    with pytest.warns(UserWarning, match=f"CLIP takes {want - 2}, so the last"):
        ids = ours("cat " * 100)
    assert ids[0, -1] == 49407, ids[0].tolist()
    assert CLIPTokenizer.from_folder(tmp_path, default_max_length=50).max_length == (want if value == 64 else 50)


@pytest.mark.parametrize("value", ["77", 2, True, 7.5])
def test_bad_model_max_length_names_the_file(bpe_path, tmp_path, value):
    CLIPTokenizer.from_bpe_file(bpe_path).save(tmp_path)
    path = tmp_path / "tokenizer_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "model_max_length": value}))
    with pytest.raises(ValueError, match=r"tokenizer_config\.json: model_max_length must be an integer >= 3"):
        CLIPTokenizer.from_folder(tmp_path)


def test_an_added_phrase_matches_across_any_whitespace(hf_folder, tmp_path):
    """An added token with a space in it ("cat toy") matches "cat   toy" and "cat\\ttoy" too, as in
    transformers: the whitespace normaliser runs before added tokens are matched."""
    hf = transformers.CLIPTokenizer.from_pretrained(hf_folder)
    assert hf.add_tokens(["cat toy"]) == 1
    hf.save_pretrained(tmp_path / "hf")
    prompts = ["a cat toy", "a cat   toy", "a cat\ttoy", "a cattoy"]
    want = hf(prompts, padding="max_length", max_length=77, return_tensors="pt").input_ids
    got = CLIPTokenizer.from_folder(tmp_path / "hf")(prompts)
    assert torch.equal(got, want), f"ours {got[:, :6].tolist()}\ntheirs {want[:, :6].tolist()}"
    assert want[1, 2].item() == 49408, f"the oracle split the phrase: {want[1, :6].tolist()}"


def test_saving_over_a_folder_removes_its_stale_added_tokens(hf_added, tmp_path):
    """A tokenizer without added tokens saved where one with them was: the folder reads back
    without them (an added_tokens.json left behind would bring '<cat-toy>' back as id 49408)."""
    hf_added.save_pretrained(tmp_path / "hf")
    CLIPTokenizer.from_folder(tmp_path / "hf").save(tmp_path / "tok")
    CLIPTokenizer.default().save(tmp_path / "tok")
    back = CLIPTokenizer.from_folder(tmp_path / "tok")
    assert back.max_id == 49407 and "<cat-toy>" not in {t["content"] for t in back.added_tokens.values()}, (
        back.max_id, back.added_tokens)
