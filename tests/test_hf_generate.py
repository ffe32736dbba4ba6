"""The Hugging Face export as `transformers` users drive it: metadata (trained length, special
tokens, generation config, model card, file modes), `generate(**tokenizer(...))`, end-of-document
stopping, left-padded batches equal to their rows run alone (cached generation and the parallel
forward), beam search through the cache equal to beam search without it, and gradient
checkpointing with the same gradients."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from megatron_atlas.configs import compose, to_model_config, to_train_config
from megatron_atlas.data.tokenizer import EOD_TOKEN, train_bpe
from megatron_atlas.hf.convert import export_hf
from megatron_atlas.model import build_model
from megatron_atlas.train.checkpoint import save_checkpoint

# memory chunk 8: the prompts below are of lengths that leave every row a different open chunk
SMALL = ["model.n_layers=1", "model.d_model=32", "model.n_heads=2", "model.memory.chunk=8",
         "model.attention.window=16", "model.vocab_size=320", "train.seq_len=96"]
PRESETS = ("titans", "atlas", "atlas_mag", "transformer")
PROMPTS = ["The river crosses a quiet valley", "An engine", "Near the old harbor the boats rest in rows",
           "x"]
TEXT = "the river crosses a quiet valley while the engine hums near the old harbor. " * 40


def _export(root: Path, preset: str, tokenizer: Path, zero_head: bool = False) -> Path:
    cfg = compose(preset, "tiny", "tiny", SMALL)
    model_cfg, train_cfg = to_model_config(cfg), to_train_config(cfg)
    torch.manual_seed(0)
    model = build_model(model_cfg)
    if zero_head:   # every logit 0: greedy picks id 0, the end-of-document token
        torch.nn.init.zeros_(model.lm_head.weight)
    run = root / f"run_{preset}{'_zero' if zero_head else ''}"
    yaml = OmegaConf.to_yaml({"model": model_cfg, "train": train_cfg})
    save_checkpoint(run, 20, {"step": 20, "model": model.state_dict()}, yaml, 1)
    records = [{"kind": "train", "step": 10, "tokens": 3840}, {"kind": "eval", "step": 10, "loss": 4.5},
               {"kind": "train", "step": 20, "tokens": 7680}, {"kind": "eval", "step": 20, "loss": 4.25},
               {"kind": "train", "step": 30, "tokens": 11520}]   # past the checkpoint: not in the card
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return export_hf(run, root / f"hf_{run.name}", tokenizer=str(tokenizer), log=lambda *_: None)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hfgen")
    tokenizer = root / "tokenizer.json"
    train_bpe([TEXT], vocab_size=300).save(tokenizer)
    out = {p: _export(root, p, tokenizer) for p in PRESETS}
    out["zero"] = _export(root, "titans", tokenizer, zero_head=True)
    return out


def _load(folder: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=True).eval()
    return model, AutoTokenizer.from_pretrained(str(folder), padding_side="left")


def test_export_carries_trained_length_special_tokens_card_and_readable_files(folders):
    folder = folders["atlas_mag"]
    config = json.loads((folder / "config.json").read_text())
    generation = json.loads((folder / "generation_config.json").read_text())
    _, tok = _load(folder)
    eod = tok.convert_tokens_to_ids(EOD_TOKEN)
    assert config["max_position_embeddings"] == 96 and tok.model_max_length == 96
    assert config["eos_token_id"] == generation["eos_token_id"] == tok.eos_token_id == eod
    assert config["pad_token_id"] == generation["pad_token_id"] == tok.pad_token_id == eod
    card = (folder / "README.md").read_text()
    assert "# atlas_mag" in card and "| tokens trained | 7.68K |" in card
    assert "| loss | 4.25 |" in card and "| training step | 20 |" in card
    assert "trust_remote_code=True" in card and "| trained sequence length | 96 |" in card
    modes = {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir()}
    assert modes["model.safetensors"] == 0o644 and set(modes.values()) == {0o644}, modes


def test_generate_takes_tokenizer_output_and_stops_at_end_of_document(folders):
    model, tok = _load(folders["titans"])
    batch = tok(PROMPTS[0], return_tensors="pt")
    assert set(batch) == {"input_ids", "attention_mask"}
    with torch.no_grad():
        assert torch.equal(model.generate(**batch, max_new_tokens=6, do_sample=False),
                           model.generate(batch.input_ids, max_new_tokens=6, do_sample=False))
        # BERT-style all-zero token types are accepted as well
        model(batch.input_ids, token_type_ids=torch.zeros_like(batch.input_ids))
    stopper, tok = _load(folders["zero"])
    with torch.no_grad():
        out = stopper.generate(**tok(PROMPTS[0], return_tensors="pt"), max_new_tokens=10, do_sample=False)
    assert out.shape[1] == batch.input_ids.shape[1] + 1 and out[0, -1] == tok.eos_token_id


@pytest.mark.parametrize("preset", PRESETS)
def test_left_padded_batch_equals_each_row_alone(folders, preset):
    model, tok = _load(folders[preset])
    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    assert not bool(batch.attention_mask.all())   # the batch is padded
    with torch.no_grad():
        together = model.generate(**batch, max_new_tokens=12, do_sample=False, min_new_tokens=12)
        logits = model(**batch).logits
        for row, text in enumerate(PROMPTS):
            alone = tok(text, return_tensors="pt")
            n = alone.input_ids.shape[1]
            single = model.generate(**alone, max_new_tokens=12, do_sample=False, min_new_tokens=12)
            assert torch.equal(together[row, together.shape[1] - single.shape[1]:], single[0]), row
            width = batch.input_ids.shape[1]
            torch.testing.assert_close(logits[row, width - n:], model(alone.input_ids).logits[0],
                                       rtol=0, atol=1e-5)


@pytest.mark.parametrize("preset", ["atlas_mag", "transformer"])
def test_beam_search_through_the_cache_equals_beam_search_without_it(folders, preset):
    """Without a cache every step re-reads the whole sequence, so no reordering is involved; with
    it, `reorder_cache` must carry each beam's memory state, open chunk and KV window along."""
    model, tok = _load(folders[preset])
    batch = tok(PROMPTS[:3], return_tensors="pt", padding=True)
    kwargs = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False, num_beams=3, num_return_sequences=2)
    with torch.no_grad():
        cached = model.generate(**batch, **kwargs)
        plain = model.generate(**batch, use_cache=False, **kwargs)
        alone = model.generate(**tok(PROMPTS[1], return_tensors="pt"), **kwargs)
    assert torch.equal(cached, plain)
    assert torch.equal(cached[2:4, cached.shape[1] - alone.shape[1]:], alone)


def test_padding_that_the_memory_would_read_is_refused(folders):
    model, tok = _load(folders["titans"])
    right = tok(PROMPTS[:2], return_tensors="pt", padding=True)
    right = {"input_ids": right.input_ids.flip(1), "attention_mask": right.attention_mask.flip(1)}
    with pytest.raises(ValueError, match="attention_mask row 1 is right-padded"):
        model(**right, use_cache=True)
    holes = torch.tensor([[1, 0, 1, 1]])
    with pytest.raises(ValueError, match="row 0 has holes"):
        model(torch.zeros(1, 4, dtype=torch.long), attention_mask=holes)


def test_gradient_checkpointing_gives_the_same_gradients(folders):
    model, tok = _load(folders["atlas_mag"])
    ids = tok(PROMPTS[2], return_tensors="pt").input_ids
    model.train()
    calls = []
    model.model.blocks[0].ffn.register_forward_hook(lambda *_: calls.append(1))

    def grads():
        model.zero_grad()
        model(ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    model.gradient_checkpointing_enable()
    assert model.is_gradient_checkpointing
    recomputed = grads()
    assert len(calls) == 3   # once without, twice (forward, then recomputed in backward) with
    model.gradient_checkpointing_disable()
    grads()
    assert len(calls) == 4 and not model.is_gradient_checkpointing
    assert plain.keys() == recomputed.keys() and len(plain) > 10
    for name in plain:
        torch.testing.assert_close(recomputed[name], plain[name], rtol=1e-5, atol=1e-7)
