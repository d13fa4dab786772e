"""Randomized positions (`lenx train --random-positions N`, Ruoss et al. 2023): each step's windows take a sorted
random subset of train_len distinct positions of [0, N), a function of (seed, step) alone; evaluation keeps 0..T-1."""

import json
from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F

from lenx.cli import main
from lenx.config import TrainConfig, resolve
from lenx.ids import config_id
from lenx.model import LenxConfig, LenxForCausalLM
from lenx.step import forward_backward
from lenx.train import get_positions

from .conftest import tiny_config, tiny_model
from .test_training import stop_training_at

TINY = ["--train-len", "16", "--batch-size", "8", "--layers", "1", "--d-model", "32", "--heads", "2",
        "--precision", "fp32", "--save-every", "1000"]
N = 256


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(**{"train_len": 16, "random_positions": N, **kw})


def test_positions_are_sorted_distinct_within_range_and_a_function_of_seed_and_step():
    for seed in (0, 3):
        for step in (0, 1, 57):
            pos = get_positions(_cfg(seed=seed), step)
            assert pos.dtype == torch.int64 and pos.shape == (16,)
            assert bool((pos[1:] > pos[:-1]).all()) and 0 <= int(pos[0]) and int(pos[-1]) < N  # sorted, distinct
            # the same again, and the same whatever the batch layout (rows, micro-batches, processes) or scheme
            for other in (_cfg(seed=seed), _cfg(seed=seed, batch_size=3, grad_accum=5, pe="alibi", steps=9)):
                assert torch.equal(get_positions(other, step), pos)
    assert not torch.equal(get_positions(_cfg(), 0), get_positions(_cfg(), 1))
    assert not torch.equal(get_positions(_cfg(), 0), get_positions(_cfg(seed=1), 0))
    assert get_positions(TrainConfig(train_len=16), 0) is None  # off: the model's own 0..T-1
    # uniform over [0, N): every position is drawn, about equally often
    counts = torch.bincount(torch.cat([get_positions(_cfg(), s) for s in range(2000)]), minlength=N)
    assert counts.shape == (N,) and int(counts.min()) > 0 and abs(counts.float().mean() - 2000 * 16 / N) < 1e-3


def _record_positions(monkeypatch) -> list:
    """Every training forward's position_ids (row shards run in threads; list.append is atomic)."""
    seen = []
    hidden = LenxForCausalLM.hidden

    def recording(self, input_ids, position_ids=None):
        if self.training:
            seen.append(None if position_ids is None else position_ids.clone())
        return hidden(self, input_ids, position_ids)

    monkeypatch.setattr(LenxForCausalLM, "hidden", recording)
    return seen


@pytest.mark.parametrize("layout", [("8", "1", 2), ("4", "2", 2), ("8", "1", 1)])
def test_every_micro_batch_and_row_shard_of_a_step_gets_the_steps_positions(layout, monkeypatch, tmp_path,
                                                                            text_dataset):
    from lenx import train as train_module

    batch, accum, shards = layout
    monkeypatch.setattr(train_module, "cpu_shards", lambda *a, **k: shards)
    seen = _record_positions(monkeypatch)
    out = tmp_path / "run"
    assert main(["train", "--pe", "learned", *TINY, "--steps", "3", "--random-positions", str(N), "--batch-size",
                 batch, "--grad-accum", accum, "--dataset", str(text_dataset), "--out", str(out)]) == 0
    per_step = int(accum) * shards
    assert len(seen) == 3 * per_step
    cfg = TrainConfig(**json.loads((out / "run.json").read_text())["config"])
    assert cfg.random_positions == N
    for i, pos in enumerate(seen):
        assert pos.shape == (1, 16) and torch.equal(pos[0], get_positions(cfg, i // per_step)), i
    assert json.loads((out / "config.json").read_text())["train_positions"] == N


def test_a_resumed_run_with_random_positions_is_bit_identical(tmp_path, text_dataset, monkeypatch):
    from safetensors.torch import load_file

    args = ["train", "--pe", "learned", *TINY[:-2], "--steps", "6", "--save-every", "3", "--random-positions",
            str(N), "--dataset", str(text_dataset)]
    assert main([*args, "--out", str(tmp_path / "ref")]) == 0
    stop_training_at(monkeypatch, 4)
    assert main([*args, "--out", str(tmp_path / "cut")]) != 0
    assert json.loads((tmp_path / "cut" / "latest.json").read_text())["step"] == 3
    monkeypatch.undo()
    assert main([*args, "--out", str(tmp_path / "cut")]) == 0
    a, b = load_file(tmp_path / "ref" / "model.safetensors"), load_file(tmp_path / "cut" / "model.safetensors")
    assert a.keys() == b.keys() and a["pe.table"].shape == (N, 32)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert int(torch.cat([get_positions(_cfg(), s) for s in range(6)]).max()) >= 16  # it trained past train_len


@pytest.mark.parametrize("args, needle", [
    (["--random-positions", "16"], "--random-positions 16 must exceed --train-len 16"),
    (["--random-positions", "8"], "give N > 16"),
    (["--random-positions", "-1"], "--random-positions must be an integer"),
    (["--pe", "xpos", "--random-positions", "100000"], "past the 56463 positions scheme 'xpos' can represent"),
])
def test_bad_values_are_refused_in_one_line(args, needle, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = main(["train", "--train-len", "16", *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert needle in err, err
    assert not any(tmp_path.iterdir())  # nothing made
    cfg = tmp_path / "c.yaml"  # the config file's key too
    cfg.write_text("train_len: 16\nrandom_positions: 16\n")
    assert main(["train", "--config", str(cfg)]) == 2
    assert "random-positions 16 must exceed --train-len 16" in capsys.readouterr().err
    cfg.unlink()


def test_off_is_the_default_and_keeps_old_config_ids():
    assert resolve(None, random_positions=0).random_positions is None  # 0: off, recorded as never set
    old = {"config": {k: v for k, v in TrainConfig().to_dict().items() if k != "random_positions"}}
    assert config_id(old) == config_id({"config": resolve(None, random_positions=0).to_dict()})
    assert config_id(old) != config_id({"config": resolve(None, random_positions=4096).to_dict()})


def test_evaluation_keeps_positions_from_zero(tmp_path, text_dataset, monkeypatch):
    """A run trained on random positions is evaluated as every run: the model gets no position_ids (0..T-1)."""
    run = tmp_path / "run"
    assert main(["train", "--pe", "rope", *TINY, "--steps", "2", "--random-positions", str(N),
                 "--dataset", str(text_dataset), "--out", str(run)]) == 0
    seen = []
    hidden = LenxForCausalLM.hidden
    monkeypatch.setattr(LenxForCausalLM, "hidden",
                        lambda self, ids, position_ids=None: seen.append(position_ids) or hidden(self, ids, position_ids))
    assert main(["eval", str(run), "--lengths", "16,64", "--tokens", "512", "--dataset", str(text_dataset),
                 "--out", str(tmp_path / "results")]) == 0
    assert seen and all(p is None for p in seen)


def test_a_learned_table_covers_the_drawn_positions_and_old_configs_load(tmp_path):
    model = LenxForCausalLM(tiny_config("learned", train_positions=N))
    assert model.pe.table.shape == (N, 32) and model.pe.max_len == N
    model.save_pretrained(tmp_path / "new")
    assert LenxForCausalLM.from_pretrained(tmp_path / "new").pe.table.shape == (N, 32)
    old = LenxForCausalLM(tiny_config("learned"))  # a run saved before the option: no train_positions key
    old.save_pretrained(tmp_path / "old")
    path = tmp_path / "old" / "config.json"
    config = json.loads(path.read_text())
    config.pop("train_positions")
    path.write_text(json.dumps(config))
    loaded = LenxForCausalLM.from_pretrained(tmp_path / "old")
    assert loaded.pe.table.shape == (16, 32) and loaded.config.train_positions is None
    torch.testing.assert_close(loaded.pe.table, old.pe.table, rtol=0, atol=0)
    assert LenxConfig().train_positions is None


SCHEMES = ["nope", "sinusoidal", "learned", "rope", "alibi", "xpos", "t5", "shaw", "kerple-log", "fire"]


@pytest.mark.parametrize("pe", SCHEMES)
def test_random_positions_train_alike_on_every_backend(pe):
    """Loss and gradients of a training forward at sorted random positions of [0, 16 x train_len): the fast
    backends (which leave the routes needing contiguous positions) equal the materialised reference, row shards
    included. FIRE's normaliser max(L, i) sees query positions past L."""
    g = torch.Generator().manual_seed(5)
    pos = torch.randperm(N, generator=g)[:16].sort().values
    batch = torch.randint(0, 60, (4, 17), generator=g)
    ref = tiny_model(pe, train_positions=N, attn_backend="materialized").train()
    results = {}
    for backend, block, shards in (("materialized", 512, 1), ("sdpa", 512, 1), ("sdpa", 4, 2), ("blocked", 4, 1)):
        model = tiny_model(pe, train_positions=N, attn_backend=backend, attn_block_size=block).train()
        model.load_state_dict(ref.state_dict())
        model.zero_grad(set_to_none=True)
        loss = forward_backward(model, batch, nullcontext, 1.0, shards, 1, positions=pos)
        results[backend, block, shards] = loss, {n: p.grad.clone() for n, p in model.named_parameters()
                                                 if p.grad is not None}
    ref_loss, ref_grads = results["materialized", 512, 1]
    assert torch.isfinite(ref_loss)
    for key, (loss, grads) in results.items():
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6, msg=lambda m: f"{key}: {m}")
        assert grads.keys() == ref_grads.keys()
        for name in grads:
            torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-5,
                                       msg=lambda m: f"{key} {name}: {m}")
    # the positions act: at 0..T-1 the loss differs (nope reads none)
    with torch.no_grad():
        at_zero = F.cross_entropy(ref(batch[:, :-1]).logits.flatten(0, 1), batch[:, 1:].flatten())
    assert (pe == "nope") == bool(torch.isclose(at_zero, ref_loss, rtol=0, atol=1e-6))


def test_alibis_key_term_route_reads_non_contiguous_positions():
    """Training on the CPU in fp32, ALiBi at random positions takes the stored route's key term (its Toeplitz table
    needs contiguous positions): g is ALiBi's integer positions, and the slopes must not be cast to integers."""
    from lenx.attention import causal_attention, recording
    from lenx.positional.base import LinearBias

    g = torch.Generator().manual_seed(2)
    pos = torch.randperm(N, generator=g)[:16].sort().values
    q, k, v = (torch.randn(2, 4, 16, 8, generator=g, requires_grad=True) for _ in range(3))
    bias = LinearBias(torch.tensor([0.5, 0.25, 0.125, 0.0625]), pos)
    assert bias.toeplitz_table() is None and bias.key_term() is not None
    with recording() as routes:
        out = causal_attention(q, k, v, bias, "sdpa")
    assert routes == {"stored"}
    torch.testing.assert_close(out, causal_attention(q, k, v, bias, "materialized"), rtol=1e-5, atol=1e-6)
