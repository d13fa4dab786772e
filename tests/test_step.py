"""Row shards (lenx/step.py): a step split by rows over threads gives the whole batch's loss and gradients."""

import json
from contextlib import nullcontext

import pytest
import torch

from lenx.cli import main
from lenx.step import cpu_shards, forward_backward

from .conftest import tiny_model

SCHEMES = ["nope", "rope", "alibi", "t5", "shaw", "fire", "learned", "xpos", "kerple-log"]


def _grads(model, batch, shards, weight=1.0, start=None):
    model.zero_grad(set_to_none=True)
    if start is not None:  # gradients already there (an earlier micro-batch): the step adds to them
        for p, g in zip(model.parameters(), start):
            p.grad = g.clone()
    loss = forward_backward(model, batch, nullcontext, weight, shards)
    return loss, [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("pe", SCHEMES)
def test_row_shards_give_the_whole_batch_loss_and_gradients(pe):
    model = tiny_model(pe).train()
    batch = torch.randint(0, 64, (5, 17), generator=torch.Generator().manual_seed(1))
    whole_loss, whole = _grads(model, batch, 1, weight=0.5)
    for shards in (2, 3, 5):  # 5 rows in 3 shards: 2, 2 and 1, weighted by their share of the rows
        loss, grads = _grads(model, batch, shards, weight=0.5)
        torch.testing.assert_close(loss, whole_loss, rtol=1e-6, atol=1e-6)
        for g, w in zip(grads, whole):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)


def test_row_shards_add_to_the_gradients_already_there():
    model = tiny_model("rope").train()
    batch = torch.randint(0, 64, (4, 17), generator=torch.Generator().manual_seed(2))
    start = [torch.randn_like(p) for p in model.parameters()]
    _, whole = _grads(model, batch, 1, start=start)
    _, sharded = _grads(model, batch, 2, start=start)
    for g, w, s in zip(sharded, whole, start):
        assert not torch.equal(g, s)
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)


def test_row_shards_give_the_same_numbers_every_time():
    """Gradients are summed in shard order, not in the order the threads finish."""
    model = tiny_model("alibi").train()
    batch = torch.randint(0, 64, (6, 17), generator=torch.Generator().manual_seed(3))
    first_loss, first = _grads(model, batch, 3)
    for _ in range(5):
        loss, grads = _grads(model, batch, 3)
        assert torch.equal(loss, first_loss)
        assert all(torch.equal(g, f) for g, f in zip(grads, first))


def test_row_shards_keep_the_callers_thread_count_and_autocast():
    seen = []

    class Net(torch.nn.Module):  # records what each shard's thread runs with
        def __init__(self):
            super().__init__()
            self.inner = tiny_model("rope").train()

        def forward(self, ids):
            seen.append((torch.get_num_threads(), torch.is_autocast_enabled("cpu")))
            return self.inner(ids)

    before = torch.get_num_threads()
    batch = torch.randint(0, 64, (4, 17))
    forward_backward(Net(), batch, lambda: torch.autocast("cpu", dtype=torch.bfloat16), shards=2)
    assert torch.get_num_threads() == before
    assert seen == [(max(1, before // 2), True)] * 2  # autocast is per thread: each shard enters its own


def test_cpu_shards_one_per_thread_on_the_cpu_only():
    threads = torch.get_num_threads()
    assert cpu_shards("cpu", 8) == min(threads, 8)
    assert cpu_shards("cpu", 1) == 1
    assert cpu_shards("cuda", 8) == 1
    assert cpu_shards("cuda:0", 8) == 1
    assert cpu_shards("cpu", 8, distributed=True) == 1  # DDP's hooks expect one backward per step
    assert cpu_shards("cpu", 8, compiled=True) == 1


def test_rope_tables_are_safe_to_build_from_threads_at_once():
    """RoPE caches its cos/sin table; shards read and replace it from several threads (no KeyError, one answer)."""
    from concurrent.futures import ThreadPoolExecutor

    scheme = tiny_model("rope").pe
    want = torch.stack(scheme._cos_sin_at(torch.arange(40), 40), -1)

    def read(n):
        pos = torch.arange(n)
        return n, scheme.prepare(pos)

    with ThreadPoolExecutor(4) as pool:
        for n, rot in pool.map(read, [10, 40, 20, 40, 30] * 20):
            torch.testing.assert_close(rot, want[:n])


def test_train_records_its_row_shards(tmp_path, text_dataset):
    out = tmp_path / "run"
    assert main(["train", "--pe", "rope", "--dataset", str(text_dataset), "--steps", "2", "--batch-size", "4",
                 "--train-len", "16", "--layers", "1", "--d-model", "32", "--heads", "2", "--d-ff", "64",
                 "--out", str(out)]) == 0
    info = json.loads((out / "run.json").read_text())
    assert info["cpu_shards"] == min(torch.get_num_threads(), 4)


def _train_step(model, **kw):
    from lenx.config import TrainConfig
    from lenx.distributed import Context
    from lenx.optim import build_optimizer
    from lenx.step import TrainStep

    cfg = TrainConfig(**{"train_len": 16, "batch_size": 4, "grad_accum": 1, "lr": 1e-3, "warmup": 2, "steps": 10, **kw})
    return TrainStep(model, model, build_optimizer(model, cfg), cfg, Context(), "cpu", nullcontext), cfg


def test_a_train_step_in_micro_batches_is_the_step_of_the_whole_batch():
    """--batch-size 2 --grad-accum 2 takes the step of --batch-size 4 on the same rows: the mean loss, the lr of
    the step's schedule, the same update."""
    from lenx.optim import lr_at

    rows = torch.randint(0, 64, (4, 17), generator=torch.Generator().manual_seed(4))
    before = {k: v.clone() for k, v in tiny_model("learned").state_dict().items()}
    results = {}
    for b, k in ((4, 1), (2, 2)):
        model = tiny_model("learned").train()
        step, cfg = _train_step(model, batch_size=b, grad_accum=k)
        results[b] = (*step(1, rows), model.state_dict())
    (loss4, lr4, after4), (loss2, lr2, after2) = results[4], results[2]
    assert lr4 == lr2 == pytest.approx(1e-3 * lr_at(cfg, 1))
    torch.testing.assert_close(loss2, loss4, rtol=1e-6, atol=0)
    assert not torch.equal(after4["wte.weight"], before["wte.weight"])
    for name in after4:
        torch.testing.assert_close(after2[name], after4[name], rtol=0, atol=1e-6)


def test_a_train_step_stops_at_a_loss_that_is_not_finite_before_updating():
    from lenx.errors import LenxError

    model = tiny_model("rope").train()
    with torch.no_grad():
        model.wte.weight[3] = float("nan")
    step, _ = _train_step(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(LenxError) as e:
        step(7, torch.full((4, 17), 3))
    assert str(e.value) == ("loss became nan at step 7; lower --lr (now 0.001) and rerun (the last good checkpoint "
                            "is kept)")
    after = model.state_dict()  # no update: every weight as it was (the poisoned row still NaN)
    assert all(torch.allclose(after[k], v, rtol=0, atol=0, equal_nan=True) for k, v in before.items())


@pytest.mark.parametrize("error", ["CUDA out of memory. Tried to allocate 2.00 GiB", "shape mismatch"])
def test_a_train_step_out_of_memory_is_a_one_line_error_and_other_errors_propagate(error):
    from lenx.errors import LenxError

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = tiny_model("rope").train()

        def forward(self, ids):
            raise RuntimeError(error)

    net = Net()
    step, _ = _train_step(net.inner, batch_size=2, grad_accum=2)
    step.net = net
    expected = LenxError if "memory" in error else RuntimeError
    with pytest.raises(expected) as e:
        step(5, torch.zeros(4, 17, dtype=torch.long))
    if expected is LenxError:
        assert str(e.value) == ("out of memory at step 5 on cpu (2 x 16 tokens a micro-batch); lower --batch-size and "
                                "raise --grad-accum to keep the global batch (the last checkpoint is kept)")
    else:
        assert str(e.value) == error
