"""The training loop: fit, train_epoch, evaluate, in process on small data made here."""

from __future__ import annotations

import contextlib
import copy
import math

import pytest
import torch
from torch import nn

from trainer.data import TensorBatches
from trainer.device import resolve_precision
from trainer.engine import LoopSettings, TrainState, evaluate, fit, seed_everything, update_best, watch_monitor
from trainer.errors import TrainingFailed

FP32 = resolve_precision("fp32", torch.device("cpu"))


class Recorder:
    """A tracker that remembers every call, to check what the loop reports and when."""

    def __init__(self) -> None:
        self.train: list[dict] = []
        self.val: list[dict] = []
        self.epochs: list[dict] = []

    def epoch_started(self, **kwargs) -> None:
        pass

    def log_train(self, **kwargs) -> None:
        self.train.append(kwargs)

    def log_val(self, **kwargs) -> None:
        self.val.append(kwargs)

    def epoch_finished(self, **kwargs) -> None:
        self.epochs.append(kwargs)


def regression_data(n=40, features=3, seed=0, batch_size=8, shuffle=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5]]) + 0.1
    return TensorBatches(x, y, batch_size=batch_size, shuffle=shuffle, seed=seed)


def classification_data(n=60, seed=0, batch_size=10):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, generator=g)
    y = (x[:, 0] > 0).long()
    return TensorBatches(x, y, batch_size=batch_size, shuffle=True, seed=seed)


def test_fit_learns_a_linear_map_and_counts_steps():
    seed_everything(0)
    model = nn.Linear(3, 1)
    batches = regression_data()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    tracker = Recorder()
    state = fit(model, batches, None, nn.MSELoss(), optimizer, LoopSettings(epochs=30, log_every=5), precision=FP32, tracker=tracker)
    assert state.step == 30 * len(batches) == 150 and state.epoch == 30
    assert state.train_loss < 1e-4
    assert torch.allclose(model.weight, torch.tensor([[1.0, -2.0, 0.5]]), atol=1e-2)
    # a train point every 5 steps, nothing between
    assert [t["step"] for t in tracker.train] == list(range(5, 151, 5))
    assert len(tracker.epochs) == 30 and tracker.val == []


def test_logged_loss_is_the_mean_over_the_window():
    # one batch per step with a constant model: every step's loss is known in advance
    model = nn.Linear(1, 1)
    with torch.no_grad():
        model.weight.zero_()
        model.bias.zero_()
    x = torch.zeros(6, 1)
    y = torch.arange(6, dtype=torch.float32).unsqueeze(1)  # squared error per batch = y^2
    batches = TensorBatches(x, y, batch_size=1, shuffle=False, seed=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: the losses stay put
    tracker = Recorder()
    fit(model, batches, None, nn.MSELoss(), optimizer, LoopSettings(epochs=1, log_every=4), precision=FP32, tracker=tracker)
    assert [t["step"] for t in tracker.train] == [4, 6]  # every 4 steps, and the last step
    assert tracker.train[0]["loss"] == pytest.approx((0 + 1 + 4 + 9) / 4)
    assert tracker.train[1]["loss"] == pytest.approx((16 + 25) / 2)
    assert tracker.epochs[0]["train_loss"] == pytest.approx(sum(v * v for v in range(6)) / 6)


def test_a_checkpoint_between_log_points_holds_the_loss_sum_as_a_plain_tensor():
    # what a checkpoint saves of the losses since the last log point must load with
    # weights_only=True, with no graph attached
    import io

    model = nn.Linear(1, 1)
    with torch.no_grad():
        model.weight.zero_()
        model.bias.zero_()
    x, y = torch.zeros(6, 1), torch.arange(6, dtype=torch.float32).unsqueeze(1)
    batches = TensorBatches(x, y, batch_size=1, shuffle=False, seed=0)
    saved = io.BytesIO()

    def after_batch(state: TrainState) -> None:
        if state.step == 3:
            torch.save(state.to_dict(), saved)

    fit(
        model, batches, None, nn.MSELoss(), torch.optim.SGD(model.parameters(), lr=0.0),
        LoopSettings(epochs=1, log_every=4), precision=FP32, after_batch=after_batch,
    )  # fmt: skip
    saved.seek(0)
    running = torch.load(saved, weights_only=True)["running"]
    assert running["pending"].item() == 0.0 + 1.0 + 4.0  # steps 1-3: squared errors y^2
    assert running["pending_batches"] == 3 and running["pending_first_step"] == 1
    assert not running["pending"].requires_grad and running["pending"].grad_fn is None


def test_a_state_from_an_earlier_checkpoint_format_resumes_its_window():
    # formats 1-2 kept a history (a list, then JSON text) and each pending step's loss
    old = {
        "step": 12, "epoch": 2, "batch_in_epoch": 0, "train_loss": 0.5, "val": {}, "best": {"train_loss": 0.5},
        "history": '[{"epoch": 1}, {"epoch": 2}]', "best_checkpoint": 0.5,
        "running": {"pending": [torch.tensor(1.0), torch.tensor(3.0)], "pending_first_step": 11, "window_loss": 4.0,
                    "epoch_loss": 0.0, "window_batches": 2, "window_samples": 16, "epoch_batches": 0,
                    "grad_norm": torch.zeros(())},
    }  # fmt: skip
    state = TrainState.from_dict(old)
    assert state.step == 12 and not hasattr(state, "history")
    x = torch.zeros(48, 1)  # 6 steps an epoch: step 12 ends epoch 2
    model = nn.Linear(1, 1)
    with torch.no_grad():
        model.weight.zero_()
        model.bias.zero_()
    tracker = Recorder()
    fit(
        model, TensorBatches(x, torch.zeros(48, 1), batch_size=8, shuffle=False, seed=0), None, nn.MSELoss(),
        torch.optim.SGD(model.parameters(), lr=0.0), LoopSettings(epochs=3, log_every=5), precision=FP32,
        state=state, tracker=tracker,
    )  # fmt: skip
    # step 15 logs the window of steps 9-15: 4.0 read before, the pending 1 + 3, and steps 13-15's 0
    assert tracker.train[0]["step"] == 15 and tracker.train[0]["loss"] == pytest.approx(8.0 / 7)


def test_max_steps_stops_mid_epoch_and_logs_the_last_step():
    model = nn.Linear(3, 1)
    batches = regression_data()  # 5 batches per epoch
    tracker = Recorder()
    state = fit(
        model, batches, None, nn.MSELoss(), torch.optim.SGD(model.parameters(), lr=0.01),
        LoopSettings(epochs=100, max_steps=12, log_every=5), precision=FP32, tracker=tracker,
    )  # fmt: skip
    assert state.step == 12 and state.epoch == 3
    assert [t["step"] for t in tracker.train] == [5, 10, 12]


def test_one_sgd_step_is_w_minus_lr_grad():
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    x, y = torch.randn(4, 3), torch.randn(4, 1)
    before = copy.deepcopy(model)
    loss = nn.functional.mse_loss(before(x), y)
    grads = torch.autograd.grad(loss, list(before.parameters()))
    expected = [p.detach() - 0.1 * g for p, g in zip(before.parameters(), grads)]
    fit(
        model, TensorBatches(x, y, batch_size=4, shuffle=False, seed=0), None, nn.MSELoss(),
        torch.optim.SGD(model.parameters(), lr=0.1), LoopSettings(epochs=1), precision=FP32,
    )  # fmt: skip
    for got, want in zip(model.parameters(), expected):
        assert torch.allclose(got, want, atol=0, rtol=1e-6)


def test_validation_accuracy_and_best_metrics():
    seed_everything(0)
    model = nn.Linear(2, 2)
    tracker = Recorder()
    improved = []
    state = fit(
        model, classification_data(), classification_data(seed=1), nn.CrossEntropyLoss(),
        torch.optim.SGD(model.parameters(), lr=0.5), LoopSettings(epochs=5, log_every=3, classification=True),
        precision=FP32, tracker=tracker, on_epoch_end=lambda s, metrics: improved.append(dict(metrics)),
    )  # fmt: skip
    assert [v["step"] for v in tracker.val] == [6, 12, 18, 24, 30]
    assert state.val["accuracy"] >= 0.9
    assert state.best["val_accuracy"] == max(v["metrics"]["accuracy"] for v in tracker.val)
    assert state.best["val_loss"] == min(v["metrics"]["loss"] for v in tracker.val)
    # the epoch-end hook gets each epoch's metrics
    assert len(improved) == 5 and set(improved[0]) == {"train_loss", "val_loss", "val_accuracy"}
    assert [m["val_accuracy"] for m in improved] == [v["metrics"]["accuracy"] for v in tracker.val]


def test_evaluate_matches_a_hand_computation():
    model = nn.Linear(2, 2)
    data = classification_data(n=25, batch_size=10)  # batches of 10, 10, 5: weights matter
    metrics = evaluate(model, data, nn.CrossEntropyLoss(), precision=FP32, classification=True)
    with torch.no_grad():
        outputs = model(data.x)
        assert metrics["loss"] == pytest.approx(nn.functional.cross_entropy(outputs, data.y).item(), rel=1e-5)
        assert metrics["accuracy"] == pytest.approx((outputs.argmax(1) == data.y).float().mean().item())
    assert model.training is False


def test_non_finite_loss_stops_the_run_naming_the_step():
    model = nn.Linear(3, 1)
    with pytest.raises(TrainingFailed, match=r"step \d+.*grad_clip"):
        fit(
            model, regression_data(), None, nn.MSELoss(), torch.optim.SGD(model.parameters(), lr=1e5),
            LoopSettings(epochs=20, log_every=1), precision=FP32,
        )  # fmt: skip


@pytest.mark.parametrize(
    ("log_every", "where"), [(1, "at step 7"), (4, "between steps 5 and 8"), (100, "between steps 1 and 10")]
)
def test_non_finite_loss_names_the_steps_it_was_read_from(log_every, where):
    # batch size 1, no shuffle: sample 6 is inf, so step 7 is the first non-finite loss, and every
    # later loss is NaN too (the update at step 7 poisons the weights). The losses are read at log
    # points and epoch ends (10 steps), so the message names the steps read there
    x = torch.arange(10, dtype=torch.float32).unsqueeze(1)
    x[6] = math.inf
    model = nn.Linear(1, 1)
    tracker = Recorder()
    with pytest.raises(TrainingFailed, match=rf"not finite {where};"):
        fit(
            model, TensorBatches(x, 2 * x, batch_size=1, shuffle=False, seed=0), None, nn.MSELoss(),
            torch.optim.SGD(model.parameters(), lr=1e-3), LoopSettings(epochs=3, log_every=log_every),
            precision=FP32, tracker=tracker,
        )  # fmt: skip
    # nothing non-finite was logged before the run stopped
    assert all(math.isfinite(t["loss"]) for t in tracker.train)
    assert [t["step"] for t in tracker.train] == list(range(log_every, 7, log_every))


def test_grad_clip_bounds_the_update():
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    start = [p.detach().clone() for p in model.parameters()]
    x, y = torch.randn(8, 3), torch.full((8, 1), 1000.0)  # a huge gradient
    fit(
        model, TensorBatches(x, y, batch_size=8, shuffle=False, seed=0), None, nn.MSELoss(),
        torch.optim.SGD(model.parameters(), lr=1.0), LoopSettings(epochs=1, grad_clip=0.5), precision=FP32,
    )  # fmt: skip
    moved = torch.sqrt(sum(((p.detach() - s) ** 2).sum() for p, s in zip(model.parameters(), start)))
    assert moved.item() == pytest.approx(0.5, rel=1e-4)  # lr 1 times the clipped norm


def test_schedulers_step_per_epoch_or_per_step():
    def lrs_after(interval, scheduler_factory, epochs=3):
        model = nn.Linear(3, 1)
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        scheduler = scheduler_factory(optimizer)
        fit(
            model, regression_data(), None, nn.MSELoss(), optimizer,
            LoopSettings(epochs=epochs, scheduler_interval=interval), precision=FP32, scheduler=scheduler,
        )  # fmt: skip
        return optimizer.param_groups[0]["lr"]

    # 3 epochs of 5 steps each
    assert lrs_after("epoch", lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5)) == pytest.approx(0.125)
    assert lrs_after("step", lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5)) == pytest.approx(0.5**15)


def test_plateau_scheduler_steps_with_the_validation_loss():
    class Recording(torch.optim.lr_scheduler.ReduceLROnPlateau):
        def step(self, metrics, epoch=None):
            seen.append(metrics)
            super().step(metrics)

    seen: list[float] = []
    model = nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    tracker = Recorder()
    fit(
        model, regression_data(), regression_data(seed=1), nn.MSELoss(), optimizer,
        LoopSettings(epochs=4), precision=FP32, scheduler=Recording(optimizer), tracker=tracker,
    )  # fmt: skip
    assert seen == [v["metrics"]["loss"] for v in tracker.val] and len(seen) == 4


def test_same_seed_same_run_different_seed_different_run():
    def final_weights(seed):
        seed_everything(seed)
        model = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Dropout(0.2), nn.Linear(8, 1))
        fit(
            model, regression_data(seed=seed), None, nn.MSELoss(), torch.optim.SGD(model.parameters(), lr=0.05),
            LoopSettings(epochs=3), precision=FP32,
        )  # fmt: skip
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    assert torch.equal(final_weights(1), final_weights(1))
    assert not torch.equal(final_weights(1), final_weights(2))


def test_bf16_autocast_trains_on_cpu():
    seed_everything(0)
    model = nn.Linear(3, 1)
    state = fit(
        model, regression_data(), None, nn.MSELoss(), torch.optim.SGD(model.parameters(), lr=0.1),
        LoopSettings(epochs=20), precision=resolve_precision("bf16", torch.device("cpu")),
    )  # fmt: skip
    assert state.train_loss < 0.05 and model.weight.dtype == torch.float32  # weights stay fp32


def test_host_syncs_scale_with_log_points_not_steps(monkeypatch):
    calls = {"item": 0}
    real_item = torch.Tensor.item

    def counting_item(self):
        calls["item"] += 1
        return real_item(self)

    monkeypatch.setattr(torch.Tensor, "item", counting_item)
    model = nn.Linear(3, 1)
    batches = TensorBatches(torch.randn(400, 3), torch.randn(400, 1), batch_size=4, shuffle=True, seed=0)
    fit(
        model, batches, None, nn.MSELoss(), torch.optim.SGD(model.parameters(), lr=0.01),
        LoopSettings(epochs=1, log_every=25), precision=FP32,
    )  # fmt: skip
    # 100 steps, 4 log points; the epoch's mean adds no read, as its last step was a log point
    assert calls["item"] == 4


def test_update_best():
    best: dict[str, float] = {}
    assert update_best(best, {"val_loss": 1.0, "val_accuracy": 0.5}) == {"val_loss", "val_accuracy"}
    assert update_best(best, {"val_loss": 2.0, "val_accuracy": 0.7}) == {"val_accuracy"}
    assert best == {"val_loss": 1.0, "val_accuracy": 0.7}
    assert not update_best(best, {"val_loss": math.nan})


def test_train_state_starts_empty():
    state = TrainState()
    assert state.step == state.epoch == 0 and state.best == {}


def test_a_non_finite_validation_metric_fails_the_run_naming_the_epoch():
    # a validation target near float32's limit: the squared error overflows to inf
    train = regression_data()
    val = TensorBatches(torch.zeros(4, 3), torch.full((4, 1), 3e38), batch_size=4, shuffle=False, seed=0)
    tracker = Recorder()
    model = nn.Linear(3, 1)
    with pytest.raises(TrainingFailed, match=r"validation loss is not finite after epoch 1 \(inf\)"):
        fit(
            model, train, val, nn.MSELoss(), torch.optim.SGD(model.parameters(), lr=0.01), LoopSettings(epochs=3),
            precision=FP32, tracker=tracker,
        )  # fmt: skip
    assert len(tracker.val) == 1  # logged (as null in metrics.jsonl), then stopped


# ---------------------------------------------------------------------------------------------
# train.accumulate, train.early_stopping, train.ema


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 1))


@pytest.mark.parametrize("accumulate", [2, 4])
def test_accumulating_n_batches_of_b_steps_like_one_batch_of_n_times_b(accumulate):
    # 44 samples: in batches of 4, 11 per epoch; with 4 accumulated the epoch's last step takes the
    # 3 left over, as one batch of 16 leaves a batch of 12; the mean loss divides each by its count
    runs = {}
    for batch_size, n in ((4, accumulate), (4 * accumulate, 1)):
        model = _mlp()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        batches = regression_data(n=44, batch_size=batch_size)
        tracker = Recorder()
        state = fit(
            model, batches, None, nn.MSELoss(), optimizer, LoopSettings(epochs=3, log_every=1, accumulate=n),
            precision=FP32, tracker=tracker,
        )  # fmt: skip
        runs[n] = (model, state, tracker)
    (big, big_state, big_log), (small, small_state, small_log) = runs[1], runs[accumulate]
    assert small_state.step == big_state.step == 3 * math.ceil(44 / (4 * accumulate))
    for a, b in zip(small.parameters(), big.parameters()):
        assert torch.allclose(a, b, rtol=0, atol=1e-6)
    # the logged loss of a step is the big batch's: the mean over the step's samples
    assert [p["step"] for p in small_log.train] == [p["step"] for p in big_log.train]
    assert [p["loss"] for p in small_log.train] == pytest.approx([p["loss"] for p in big_log.train], rel=1e-6)


class CountsSyncs(nn.Module):
    """DDP's no_sync switch on a plain model: which backward passes ran inside it."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module, self.synced = module, []
        self._inside = False

    def forward(self, x):
        self.synced.append(not self._inside)
        return self.module(x)

    @contextlib.contextmanager
    def no_sync(self):
        self._inside = True
        try:
            yield
        finally:
            self._inside = False


def test_under_ddp_only_the_stepping_batch_all_reduces_gradients():
    # DistributedDataParallel reads no_sync() in its forward, and all-reduces in the backward that
    # follows: 10 batches, 3 accumulated, so steps after batches 3, 6, 9 and the epoch's last
    model = CountsSyncs(_mlp())
    fit(
        model, regression_data(n=40, batch_size=4), None, nn.MSELoss(), torch.optim.SGD(model.parameters(), lr=0.01),
        LoopSettings(epochs=1, accumulate=3), precision=FP32,
    )  # fmt: skip
    assert model.synced == [i % 3 == 2 or i == 9 for i in range(10)]


def test_early_stopping_counts_epochs_without_an_improvement_of_min_delta():
    settings = LoopSettings(epochs=100, monitor="val_loss", mode="min", patience=2, min_delta=0.1)
    state = TrainState()
    stopped_after = None
    for epoch, value in enumerate([1.0, 0.95, 0.85, 0.84, 0.83, 0.5], start=1):
        state.epoch = epoch
        watch_monitor(state, {"val_loss": value}, settings)
        if state.stopped_early:
            stopped_after = epoch
            break
    # 0.95 is no improvement by 0.1 on 1.0; 0.85 is; 0.84 and 0.83 are not on 0.85: stop after epoch 5,
    # while best.pt follows every improvement, so it holds epoch 5
    assert stopped_after == 5 and state.stale_epochs == 2 and state.patience_best == 0.85
    assert state.best_epoch == 5 and state.best_checkpoint == 0.83


@pytest.mark.parametrize("epochs,stopped", [(10, True), (3, False)])
def test_a_run_that_stops_improving_ends_after_patience_epochs(epochs, stopped):
    # lr 0: the loss never improves after epoch 1, so epochs 2 and 3 are the patience of 2; a budget
    # that ends at epoch 3 anyway ends the run, not early stopping
    model = nn.Linear(3, 1)
    state = fit(
        model, regression_data(), None, nn.MSELoss(), torch.optim.SGD(model.parameters(), lr=0.0),
        LoopSettings(epochs=epochs, monitor="train_loss", patience=2), precision=FP32,
    )  # fmt: skip
    assert state.epoch == 3 and state.stopped_early is stopped and state.best_epoch == 1


def test_ema_follows_every_step_and_validation_uses_it():
    from trainer.build import averaged_model

    model = _mlp()
    ema = averaged_model(model, decay=0.8)
    expected = [p.detach().clone() for p in model.parameters()]
    steps = []

    def after_batch(state: TrainState) -> None:  # the EMA by hand: the first step copies, then lerps
        for average, param in zip(expected, model.parameters()):
            average.copy_(param.detach() if not steps else 0.8 * average + 0.2 * param.detach())
        steps.append(state.step)

    val = regression_data(n=16, seed=1)
    state = fit(
        model, regression_data(), val, nn.MSELoss(), torch.optim.SGD(model.parameters(), lr=0.1),
        LoopSettings(epochs=2), precision=FP32, after_batch=after_batch, ema=ema,
    )  # fmt: skip
    assert len(steps) == 10 and int(ema.n_averaged) == 10
    for average, kept in zip(expected, ema.module.parameters()):
        assert torch.allclose(average, kept, atol=1e-6)
    assert not torch.equal(expected[0], model[0].weight)  # the trained weights moved on ahead
    assert state.val == evaluate(ema.module, val, nn.MSELoss(), precision=FP32, classification=False)
    assert state.val != evaluate(model, val, nn.MSELoss(), precision=FP32, classification=False)
