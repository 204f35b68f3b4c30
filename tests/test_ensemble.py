import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from ddpm_seg.benchmarks.original import OriginalClassifier  # the original pixel_classifier layout
from ddpm_seg.ensemble import MLPEnsemble, member_seed, predict_logits, scaled_lr, train_ensemble
from ddpm_seg.feature_store import FeatureStore, PixelSampler

DIM, CLASSES, MEMBERS = 12, 3, 3


def randomise(ensemble, seed=0):
    """Non-trivial biases, batch-norm affine and running stats, so format mix-ups show in outputs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for fc in (ensemble.fc1, ensemble.fc2, ensemble.fc3):
            fc.bias.copy_(torch.randn(fc.bias.shape, generator=gen) * 0.1)
        for bn in (ensemble.bn1, ensemble.bn2):
            bn.weight.copy_(1 + 0.3 * torch.randn(bn.weight.shape, generator=gen))
            bn.bias.copy_(0.3 * torch.randn(bn.bias.shape, generator=gen))
            bn.running_mean.copy_(0.05 * torch.randn(bn.running_mean.shape, generator=gen))
            bn.running_var.copy_(0.01 + 0.02 * torch.rand(bn.running_var.shape, generator=gen))
            bn.num_batches_tracked.fill_(7)
    return ensemble


def original_from_member(ensemble, m):
    net = nn.DataParallel(OriginalClassifier(ensemble.dim, ensemble.num_classes))
    net.load_state_dict(ensemble.member_state_dict(m), strict=True)
    return net


def test_init_follows_the_paper_and_members_differ():
    ens = MLPEnsemble(64, CLASSES, MEMBERS, seed=0)
    sds = [ens.member_state_dict(m) for m in range(MEMBERS)]
    w = sds[0]["module.layers.0.weight"]
    assert w.shape == (128, 64) and abs(w.std().item() - 0.02) < 0.001 and abs(w.mean().item()) < 0.001
    assert all(sd[f"module.layers.{i}.bias"].abs().max() == 0 for sd in sds for i in (0, 3, 6))
    assert torch.equal(sds[0]["module.layers.2.weight"], torch.ones(128))
    assert not torch.equal(sds[0]["module.layers.0.weight"], sds[1]["module.layers.0.weight"])
    # A member's init depends only on (seed, m): an ensemble of another size holds the same member 1.
    other = MLPEnsemble(64, CLASSES, 2, seed=0).member_state_dict(1)
    assert all(torch.equal(other[k], sds[1][k]) for k in other)
    assert not torch.equal(MLPEnsemble(64, CLASSES, 2, seed=1).fc1.weight[1], ens.fc1.weight[1])


def test_hidden_widths_follow_class_count():
    assert MLPEnsemble(DIM, 29, 1).member_state_dict(0)["module.layers.3.weight"].shape == (32, 128)
    assert MLPEnsemble(DIM, 30, 1).member_state_dict(0)["module.layers.3.weight"].shape == (128, 256)


def test_batched_forward_equals_original_members():
    ens = randomise(MLPEnsemble(DIM, CLASSES, MEMBERS))
    originals = [original_from_member(ens, m).module for m in range(MEMBERS)]
    x = torch.randn(MEMBERS, 20, DIM)
    for train in (True, False):
        ens.train(train)
        out = ens(x)
        for m, net in enumerate(originals):
            net.train(train)
            assert torch.allclose(out[m], net(x[m]), atol=1e-5)
    # Running statistics were updated exactly as nn.BatchNorm1d updates them.
    for m, net in enumerate(originals):
        ours, theirs = ens.member_state_dict(m), net.state_dict()
        for key, value in theirs.items():
            assert torch.allclose(ours["module." + key].float(), value.float(), atol=1e-6), key
    # A subset forward touches only the listed members' statistics.
    before = ens.bn1.running_mean.clone()
    ens.train()
    sub = ens(x[[0, 2]], torch.tensor([0, 2]))
    assert sub.shape == (2, 20, CLASSES)
    assert torch.equal(ens.bn1.running_mean[1], before[1]) and not torch.equal(ens.bn1.running_mean[0], before[0])


def test_original_format_round_trip_and_compatibility(tmp_path):
    ens = randomise(MLPEnsemble(DIM, CLASSES, MEMBERS, seed=0)).eval()
    x = torch.randn(40, DIM)
    ours_path = tmp_path / "model_1.pth"
    ens.save_member(str(ours_path), 1)

    # The original code loads our file strictly and predicts the same.
    theirs = nn.DataParallel(OriginalClassifier(DIM, CLASSES))
    theirs.load_state_dict(torch.load(ours_path, weights_only=True)["model_state_dict"], strict=True)
    theirs.eval()
    expected = ens(x.expand(MEMBERS, -1, -1))[1]
    assert torch.allclose(theirs.module(x), expected, atol=1e-6)

    # Round trip into another ensemble's member 0.
    other = MLPEnsemble(DIM, CLASSES, 2, seed=5).eval()
    other.load_member(str(ours_path), 0)
    assert all(torch.equal(v, ens.member_state_dict(1)[k]) for k, v in other.member_state_dict(0).items())
    assert torch.allclose(other(x.expand(2, -1, -1))[0], expected, atol=1e-6)

    # And the other direction: a file written by the original code.
    orig = nn.DataParallel(OriginalClassifier(DIM, CLASSES))
    with torch.no_grad():
        for p in orig.parameters():
            p.normal_(0, 0.3)
        orig.module.layers[2].running_var.uniform_(0.5, 2)
        orig.module.layers[5].running_mean.normal_()
    orig.eval()
    theirs_path = tmp_path / "model_0.pth"
    torch.save({"model_state_dict": orig.state_dict()}, theirs_path)
    untouched = ens.member_state_dict(0)
    ens.load_member(str(theirs_path), 2)
    assert torch.allclose(ens(x.expand(MEMBERS, -1, -1))[2], orig.module(x), atol=1e-5)
    assert all(torch.equal(v, untouched[k]) for k, v in ens.member_state_dict(0).items())
    # Keys without the DataParallel prefix load too.
    ens.load_member_state_dict(0, orig.module.state_dict())
    assert torch.allclose(ens(x.expand(MEMBERS, -1, -1))[0], orig.module(x), atol=1e-5)


def test_loading_bad_checkpoints_names_file_and_keys(tmp_path):
    ens = MLPEnsemble(DIM, CLASSES, 1)
    sd = ens.member_state_dict(0)
    del sd["module.layers.5.running_var"]
    sd["module.layers.6.weight"] = torch.zeros(CLASSES + 1, 32)
    sd["module.extra"] = torch.zeros(1)
    path = tmp_path / "model_3.pth"
    torch.save({"model_state_dict": sd}, path)
    with pytest.raises(ValueError) as err:
        ens.load_member(str(path), 0)
    for fragment in ("model_3.pth", "layers.5.running_var", "layers.6.weight: checkpoint (4, 32) vs model (3, 32)", "extra"):
        assert fragment in str(err.value)
    torch.save({"weights": {}}, path)
    with pytest.raises(ValueError, match="model_state_dict"):
        ens.load_member(str(path), 0)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        ens.load_member(str(tmp_path / "missing.pth"), 0)


def test_predict_logits_equals_naive_upsample_concat_mlp():
    shapes = [(4, 4, 5), (3, 9, 7), (2, 4, 5), (3, 18, 14)]  # incl. two maps at one resolution, same-res
    size = (18, 14)
    gen = torch.Generator().manual_seed(0)
    maps = [torch.randn(s, generator=gen) for s in shapes]
    ens = randomise(MLPEnsemble(sum(c for c, _, _ in shapes), CLASSES, MEMBERS))
    ens.train()
    got = predict_logits(ens, [m.half() for m in maps], size, chunk=37)
    assert ens.training  # mode restored

    feats = torch.cat([F.interpolate(m.half().float()[None], size, mode="bilinear", align_corners=False)[0]
                       for m in maps])
    ens.eval()
    naive = ens(feats.reshape(feats.shape[0], -1).t().expand(MEMBERS, -1, -1))
    naive = naive.transpose(1, 2).reshape(MEMBERS, CLASSES, *size)
    assert got.shape == naive.shape
    assert (got - naive).abs().max().item() <= 1e-4
    assert naive.std(dim=(2, 3)).min().item() > 1e-2  # logits really vary over the image
    with pytest.raises(ValueError, match="channels"):
        predict_logits(ens, maps[:-1], size)


def separable_problem(constant=False, labels=None, num_images=2, size=(8, 8)):
    """Two label maps with an ignored first row (112 labelled pixels) and their feature store.

    Features: a full-resolution one-hot of the label (learnable), plus a coarse noise map. With
    `constant`, every pixel has the same features (nothing to learn)."""
    gen = torch.Generator().manual_seed(0)
    if labels is None:
        labels = torch.randint(0, CLASSES, (num_images, *size), generator=gen)
    labels = labels.clone()
    labels[:, 0] = 255
    store = FeatureStore([(CLASSES, *size), (DIM - CLASSES, 3, 4)], size, num_images, dtype=torch.float32)
    for i in range(num_images):
        if constant:
            maps = [torch.ones(CLASSES, *size), torch.ones(DIM - CLASSES, 3, 4)]
        else:
            onehot = 2 * F.one_hot(labels[i].clamp(max=CLASSES - 1), CLASSES).permute(2, 0, 1).float()
            maps = [onehot + 0.1 * torch.randn(onehot.shape, generator=gen),
                    torch.randn(DIM - CLASSES, 3, 4, generator=gen)]
        store.put(i, maps)
    return store, PixelSampler(labels)


def test_member_trained_in_ensemble_matches_member_trained_alone():
    # In float64: Adam turns float32 rounding noise in analytically-zero gradients (e.g. a bias
    # ahead of batch norm) into whole lr-sized steps, so float32 runs drift apart by design.
    store, sampler = separable_problem()
    ens = MLPEnsemble(DIM, CLASSES, MEMBERS, seed=0).double()
    initial = [ens.member_state_dict(m) for m in range(MEMBERS)]
    stats = train_ensemble(ens, store, sampler, seed=1, batch_size=16, max_epochs=3, lr=1e-2, progress=False)
    assert [s["steps"] for s in stats.values()] == [21] * MEMBERS  # 112 pixels / 16, 3 epochs

    for m in (0, 2):
        # The original loop: one nn.Sequential, its own Adam, the member's own pixel stream.
        net = nn.DataParallel(OriginalClassifier(DIM, CLASSES).double())
        net.load_state_dict(initial[m], strict=True)
        net.train()
        opt = torch.optim.Adam(net.parameters(), lr=1e-2)
        for epoch, idx in sampler.stream(member_seed(1, m), 16):
            if epoch == 3:
                break
            img, ys, xs, target = sampler.lookup(idx)
            loss = F.cross_entropy(net.module(store.gather(img, ys, xs, out_dtype=torch.float64)), target)
            opt.zero_grad()
            loss.backward()
            opt.step()
        ours = ens.member_state_dict(m)
        for key, value in net.state_dict().items():
            assert torch.allclose(ours[key], value, rtol=0, atol=1e-9), key
        assert not torch.allclose(ours["module.layers.0.weight"], initial[m]["module.layers.0.weight"])
    trained = [ens.member_state_dict(m)["module.layers.0.weight"] for m in range(MEMBERS)]
    assert not torch.equal(trained[0], trained[1])


def test_stopping_rule_on_a_plateau():
    # Constant features, one class, lr 0: every batch loss is identical, so the first batch of
    # epoch 4 (index > 3) sets the best and the 51st equal loss after it exceeds the patience of 50.
    store, sampler = separable_problem(constant=True, labels=torch.zeros(2, 8, 8, dtype=torch.long))
    done = []
    stats = train_ensemble(MLPEnsemble(DIM, CLASSES, MEMBERS), store, sampler, seed=0, batch_size=16, lr=0.0,
                           on_member_done=done.append, progress=False)
    assert sorted(done) == list(range(MEMBERS))
    for s in stats.values():
        assert s["steps"] == 4 * 7 + 52 and s["epoch"] == 4 + 51 // 7

    done.clear()
    stats = train_ensemble(MLPEnsemble(DIM, CLASSES, MEMBERS), store, sampler, seed=0, batch_size=16, lr=0.0,
                           max_epochs=2, on_member_done=done.append, progress=True)
    assert sorted(done) == list(range(MEMBERS)) and all(s["steps"] == 14 for s in stats.values())


def test_stopped_and_untrained_members_do_not_change():
    # Random labels over identical features: losses wander, so members stop at different steps.
    gen = torch.Generator().manual_seed(1)
    labels = torch.randint(0, CLASSES, (2, 8, 8), generator=gen)
    store, sampler = separable_problem(constant=True, labels=labels)
    ens = MLPEnsemble(DIM, CLASSES, 4, seed=0)
    untrained = ens.member_state_dict(1)
    at_stop = {}

    def snapshot(m):
        at_stop[m] = ens.member_state_dict(m)

    stats = train_ensemble(ens, store, sampler, seed=0, batch_size=16, lr=1e-2, members=[0, 2, 3],
                           on_member_done=snapshot, progress=False)
    assert sorted(at_stop) == [0, 2, 3]
    assert len({s["steps"] for s in stats.values()}) > 1  # members really stopped at different times
    for m, snap in at_stop.items():
        assert all(torch.equal(v, snap[k]) for k, v in ens.member_state_dict(m).items()), m
    assert all(torch.equal(v, untrained[k]) for k, v in ens.member_state_dict(1).items())


def test_bf16_autocast_training_learns():
    store, sampler = separable_problem()
    ens = MLPEnsemble(DIM, CLASSES, 2, seed=0)
    train_ensemble(ens, store, sampler, seed=0, batch_size=16, max_epochs=4, lr=1e-2,
                   matmul_dtype=torch.bfloat16, progress=False)
    assert ens.fc1.weight.dtype == torch.float32
    img, ys, xs, target = sampler.lookup(sampler.valid)
    ens.eval()
    with torch.no_grad():
        logits = ens(store.gather(img, ys, xs).expand(2, -1, -1))
    for m in range(2):
        assert F.cross_entropy(logits[m], target).item() < 0.3  # from log(3) = 1.1 at init
        assert (logits[m].argmax(1) == target).float().mean().item() > 0.95


def test_train_rejects_mismatched_inputs():
    store, sampler = separable_problem()
    with pytest.raises(ValueError, match="features per pixel"):
        train_ensemble(MLPEnsemble(DIM + 1, CLASSES, 1), store, sampler, seed=0, progress=False)
    with pytest.raises(ValueError, match="labels must lie in"):
        train_ensemble(MLPEnsemble(DIM, 2, 1), store, sampler, seed=0, progress=False)


def test_first_layer_over_table_parts_equals_one_matmul():
    """Features given as per-resolution parts (columns in another order) give the same output and the same
    weight and bias gradients as the plain [A, B, dim] matmul, members subset included (float64: exact)."""
    shapes = [(3, 4, 4), (2, 8, 8), (5, 4, 4), (2, 8, 8)]
    store = FeatureStore(shapes, (8, 8), 1)
    dim = sum(c for c, _, _ in shapes)
    ens = randomise(MLPEnsemble(dim, CLASSES, MEMBERS)).double()
    x = torch.randn(2, 7, dim, dtype=torch.float64)
    parts = [torch.cat([x[..., f:f + c] for f, _, c in blocks], dim=2) for blocks in store.blocks]
    members = torch.tensor([2, 0])
    grads = []
    for kind in ("plain", "parts"):
        ens.zero_grad()
        if kind == "plain":
            z = torch.baddbmm(ens.fc1.bias[members].unsqueeze(1), x, ens.fc1.weight[members].transpose(1, 2))
        else:
            z = ens.fc1.forward_parts(parts, store.blocks, members)
        (z * torch.linspace(-1, 1, z.numel(), dtype=torch.float64).view_as(z)).sum().backward()
        grads.append((z.detach(), ens.fc1.weight.grad.clone(), ens.fc1.bias.grad.clone()))
    for plain, by_parts in zip(*grads):
        assert torch.allclose(plain, by_parts, atol=1e-12, rtol=0)
    assert ens.fc1.weight.grad[1].abs().max() == 0 and ens.fc1.weight.grad[0].abs().max() > 0


def test_learning_rate_scales_with_the_square_root_of_the_batch():
    assert scaled_lr(64) == pytest.approx(1e-3) and scaled_lr(1024) == pytest.approx(4e-3)
    assert scaled_lr(256) == pytest.approx(2e-3)


def test_training_progress_in_a_redirected_log_shows_steps_epoch_members_and_loss(capsys):
    torch.manual_seed(0)
    store = FeatureStore([(4, 4, 4)], (8, 8), 2)
    for i in range(2):
        store.put(i, [torch.randn(4, 4, 4)])
    sampler = PixelSampler(torch.randint(0, 3, (2, 8, 8)))
    train_ensemble(MLPEnsemble(4, 3, 2), store, sampler, seed=0, batch_size=16, steps=20)
    err = capsys.readouterr().err  # not a terminal: whole lines, the last one the closed bar
    lines = [line for line in err.splitlines() if line.startswith("train ensemble")]
    assert "\r" not in err and lines, err
    assert "20/20" in lines[-1] and "step" in lines[-1] and "epoch=3" in lines[-1] and "training=" in lines[-1]
    assert "loss=" in lines[-1]
    assert err.splitlines()[-1].startswith("trained members [0, 1] in ") and "up to 20 steps and 3 epochs" in err
