"""lorabook.train: the one loop lowers the loss, measures itself, and refuses bad input."""

import pytest
import torch

from lorabook.train import TrainConfig, batches, count_trainable, train


def _items(n=16, T=12, vocab=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    # a learnable pattern: token t is followed by t + 1
    starts = torch.randint(3, vocab - T - 1, (n,), generator=g)
    return [{"input_ids": (s + torch.arange(T)).tolist()} for s in starts]


def _collate(items):
    ids = torch.tensor([it["input_ids"] for it in items])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def test_training_lowers_the_loss_and_records_history(tiny_llama):
    cfg = TrainConfig(steps=30, lr=1e-2, batch_size=4, warmup_steps=2, progress=False)
    evals = []
    hist = train(tiny_llama, _items(n=8), cfg, _collate, eval_fn=lambda m: evals.append(m.training) or {"acc": 1.0})
    assert len(hist.loss) == len(hist.step_time_s) == len(hist.tokens) == 30
    assert sum(hist.loss[-5:]) / 5 < 0.5 * sum(hist.loss[:5]) / 5
    assert hist.tokens[0] == 4 * 12 == hist.output_rows[0]  # every position predicts a target
    assert evals == [False] and hist.evals == [{"step": 30, "acc": 1.0}]  # eval mode inside eval_fn
    assert tiny_llama.training is False  # restored to the mode it came in
    trainable, total = count_trainable(tiny_llama)
    assert hist.trainable_params == trainable == total
    assert hist.tokens_per_s > 0 and hist.peak_memory_bytes > 0
    row = hist.summary()
    assert row["acc"] == 1.0 and row["trainable_%"] == pytest.approx(100.0)



def test_loss_on_targets_only_runs_the_output_layer_on_them(tiny_llama):
    """Prompt positions (label -100) skip the output layer; the recorded loss is the model's own."""
    def masked(items):
        batch = _collate(items)
        batch["labels"][:, :8] = -100  # the first 8 of 12 tokens are the prompt
        return batch

    first = next(batches(_items(), 4, seed=0))
    with torch.no_grad():
        expected = tiny_llama(**masked(first)).loss.item()  # all 12 positions through the output layer
    seen = []
    tiny_llama.lm_head.register_forward_hook(lambda m, args, out: seen.append(tuple(out.shape)))
    hist = train(tiny_llama, _items(), TrainConfig(steps=2, batch_size=4, progress=False), masked)
    assert hist.loss[0] == pytest.approx(expected, rel=1e-6)
    assert seen == [(4, 5, 128)] * 2  # positions 7..11: position 7 predicts the first target
    assert hist.tokens[0] == 4 * 12  # the whole sequences still run through the blocks
    assert hist.output_rows == [4 * 5] * 2


def test_same_seed_same_run(tiny_llama):
    state = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    cfg = TrainConfig(steps=5, lr=1e-3, batch_size=4, progress=False)
    a = train(tiny_llama, _items(), cfg, _collate).loss
    tiny_llama.load_state_dict(state)
    b = train(tiny_llama, _items(), cfg, _collate).loss
    assert a == b


def test_frozen_parameters_stay_put(tiny_llama):
    for name, p in tiny_llama.named_parameters():
        p.requires_grad_("q_proj" in name)
    frozen = {n: p.clone() for n, p in tiny_llama.named_parameters() if not p.requires_grad}
    hist = train(tiny_llama, _items(), TrainConfig(steps=3, lr=1e-2, batch_size=4, progress=False), _collate)
    assert all(torch.equal(p, frozen[n]) for n, p in tiny_llama.named_parameters() if n in frozen)
    assert hist.trainable_params == sum(p.numel() for n, p in tiny_llama.named_parameters() if "q_proj" in n)


def test_batches_cover_every_item_each_epoch():
    gen = batches(list(range(10)), batch_size=5, seed=0)
    epoch = next(gen) + next(gen)
    assert sorted(epoch) == list(range(10))


@pytest.mark.parametrize("kwargs, match", [({"steps": 0}, "steps"), ({"lr": 0}, "lr"),
                                           ({"optimizer": "sgd"}, "optimizer")])
def test_bad_config_is_a_clear_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kwargs)


def test_nothing_trainable_or_too_few_items(tiny_llama):
    for p in tiny_llama.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable"):
        train(tiny_llama, _items(), TrainConfig(steps=1, progress=False), _collate)
    with pytest.raises(ValueError, match="cannot fill a batch"):
        next(batches([1, 2], batch_size=4, seed=0))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_paged_adamw_needs_cuda(tiny_llama):
    with pytest.raises(ValueError, match="CUDA"):
        train(tiny_llama, _items(), TrainConfig(steps=1, optimizer="paged_adamw", progress=False), _collate)


def test_gradient_checkpointing_is_quiet_and_gives_the_same_run(tiny_llama, capfd):
    """Checkpointing recomputes activations: same losses, no deprecation or use_cache notices."""
    import copy
    import warnings

    plain = copy.deepcopy(tiny_llama)
    cfg = dict(steps=3, lr=1e-2, batch_size=4, progress=False)
    tiny_llama.config.use_cache = True
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ckpt = train(tiny_llama, _items(n=8), TrainConfig(**cfg, gradient_checkpointing=True), _collate)
    ref = train(plain, _items(n=8), TrainConfig(**cfg), _collate)
    assert ckpt.loss == pytest.approx(ref.loss, rel=1e-5)
    noisy = [str(w.message) for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))
             or "use_cache" in str(w.message)]
    assert not noisy, noisy
    assert "use_cache" not in capfd.readouterr().err
    assert tiny_llama.config.use_cache is True  # restored
    assert not tiny_llama.is_activation_checkpointing  # switched off again
