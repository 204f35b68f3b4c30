import math

import numpy as np
import pytest
import torch
from torch.distributions import Categorical

from ddpm_seg.evaluate import (
    ConfusionMatrix,
    format_iou_table,
    image_uncertainty_score,
    majority_vote,
    uncertainty_map,
)


def _official_miou(preds, gts, number_class, ignore_label):
    """The rule of the official compute_iou, restated: per class id except ignore_label,
    union counts pixels where pred == c or gt == c over all images; IoU = inter / (1e-8 + union);
    plain mean over those ids."""
    ious = []
    for c in range(number_class):
        if c == ignore_label:
            continue
        inter = sum(int(((p == c) & (g == c)).sum()) for p, g in zip(preds, gts))
        union = sum(int(((p == c) | (g == c)).sum()) for p, g in zip(preds, gts))
        ious.append(inter / (1e-8 + union))
    return float(np.mean(ious))


def test_perfect_prediction_scores_one():
    gt = torch.tensor([[0, 1, 2], [2, 1, 255]])
    pred = torch.tensor([[0, 1, 2], [2, 1, 1]])  # any class on the ignored pixel
    cm = ConfusionMatrix(3, ignore_label=255, drop_ignored_pixels=True)
    cm.update(pred, gt)
    assert cm.miou() == 1.0
    np.testing.assert_array_equal(cm.iou(), [1.0, 1.0, 1.0])


def test_hand_computed_three_classes():
    gt = np.array([[0, 0, 1], [1, 2, 2]])
    pred = np.array([[0, 1, 1], [1, 2, 0]])
    cm = ConfusionMatrix(3, ignore_label=255)
    cm.update(pred, gt)
    # class 0: inter 1, union 3; class 1: inter 2, union 3; class 2: inter 1, union 2
    np.testing.assert_allclose(cm.iou(), [1 / 3, 2 / 3, 1 / 2])
    assert cm.miou() == pytest.approx(0.5)


def test_sums_over_the_test_set_before_dividing():
    cm = ConfusionMatrix(2, ignore_label=255)
    cm.update(torch.tensor([1, 1, 1, 1]), torch.tensor([1, 1, 1, 1]))
    cm.update(torch.tensor([0, 0, 0, 0]), torch.tensor([1, 0, 0, 0]))
    # class 1: inter 4, union 5 (a per-image average would give 0.5); class 0: inter 3, union 4
    np.testing.assert_allclose(cm.iou(), [0.75, 0.8])
    assert cm.miou() == pytest.approx(0.775)


def test_absent_class_counts_zero_like_official():
    gt = torch.tensor([[0, 0], [1, 1]])
    cm = ConfusionMatrix(3, ignore_label=255)
    cm.update(gt.clone(), gt)
    ious = cm.iou()
    assert ious[0] == 1.0 and ious[1] == 1.0 and math.isnan(ious[2])
    # Class 2 never appears in ground truth or prediction: official code averages it in as 0.
    assert cm.miou() == pytest.approx(2 / 3)
    assert cm.miou() == pytest.approx(_official_miou([gt.numpy()], [gt.numpy()], 3, 255))


def test_class_in_ground_truth_never_predicted_is_zero_not_nan():
    cm = ConfusionMatrix(2, ignore_label=255)
    cm.update(torch.tensor([0, 0]), torch.tensor([0, 1]))
    np.testing.assert_allclose(cm.iou(), [0.5, 0.0])


def test_ignored_ground_truth_pixels():
    gt = torch.tensor([[0, 1], [255, 255]])
    pred = torch.tensor([[0, 1], [1, 1]])
    official = ConfusionMatrix(2, ignore_label=255)
    official.update(pred, gt)
    # Official rule: a prediction of class 1 on an ignored pixel is still a false positive of 1.
    np.testing.assert_allclose(official.iou(), [1.0, 1 / 3])
    assert official.miou() == pytest.approx(_official_miou([pred.numpy()], [gt.numpy()], 2, 255))
    dropped = ConfusionMatrix(2, ignore_label=255, drop_ignored_pixels=True)
    dropped.update(pred, gt)
    # Wrong predictions on ignored pixels do not matter once they are dropped.
    assert dropped.miou() == 1.0


def test_ignore_label_that_is_a_class_id():
    # bedroom_28 style: label 0 is background and is ignored.
    gt = torch.tensor([[0, 0, 1], [2, 2, 1]])
    pred = torch.tensor([[0, 2, 1], [2, 2, 0]])
    official = ConfusionMatrix(3, ignore_label=0)
    official.update(pred, gt)
    ious = official.iou()
    assert math.isnan(ious[0])
    # class 1: inter 1, union 2 (pred 0 on a class-1 pixel is a miss); class 2: inter 2, union 3
    np.testing.assert_allclose(ious[1:], [0.5, 2 / 3])
    assert official.miou() == pytest.approx((0.5 + 2 / 3) / 2)
    dropped = ConfusionMatrix(3, ignore_label=0, drop_ignored_pixels=True)
    dropped.update(pred, gt)
    np.testing.assert_allclose(dropped.iou()[1:], [0.5, 1.0])


@pytest.mark.parametrize("number_class,ignore_label", [(5, 0), (5, 255), (4, 3)])
def test_matches_official_rule_on_random_sets(number_class, ignore_label):
    gen = torch.Generator().manual_seed(number_class + ignore_label)
    cm = ConfusionMatrix(number_class, ignore_label)
    preds, gts = [], []
    for _ in range(4):
        gt = torch.randint(0, number_class, (16, 16), generator=gen)
        gt[torch.rand(16, 16, generator=gen) < 0.2] = ignore_label
        # Drop the last class from predictions sometimes, so rare classes are exercised.
        pred = torch.randint(0, number_class - 1, (16, 16), generator=gen)
        cm.update(pred, gt)
        preds.append(pred.numpy())
        gts.append(gt.numpy())
    assert cm.miou() == pytest.approx(_official_miou(preds, gts, number_class, ignore_label), rel=1e-7)


def test_batched_update_equals_per_image_updates():
    gen = torch.Generator().manual_seed(0)
    gt = torch.randint(0, 4, (3, 8, 8), generator=gen)
    pred = torch.randint(0, 4, (3, 8, 8), generator=gen)
    batched, single = ConfusionMatrix(4, 0), ConfusionMatrix(4, 0)
    batched.update(pred, gt)
    for p, g in zip(pred, gt):
        single.update(p, g)
    np.testing.assert_array_equal(batched.counts, single.counts)


def test_bad_labels_raise():
    cm = ConfusionMatrix(3, ignore_label=255)
    with pytest.raises(ValueError, match="outside 0..2"):
        cm.update(torch.tensor([0, 3]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"\[7\]"):
        cm.update(torch.tensor([0, 1]), torch.tensor([0, 7]))
    with pytest.raises(ValueError, match="shape"):
        cm.update(torch.tensor([0, 1]), torch.tensor([[0, 1]]))
    with pytest.raises(ValueError, match="integer"):
        cm.update(torch.tensor([0.0, 1.0]), torch.tensor([0, 1]))
    assert cm.counts.sum() == 0


def test_majority_vote_clear_majority():
    # 3 members, 2 classes, 1x2 image: pixel 0 votes (1, 1, 0), pixel 1 votes (0, 0, 1)
    logits = torch.tensor([
        [[[0.0, 2.0]], [[1.0, 0.0]]],
        [[[0.0, 2.0]], [[1.0, 0.0]]],
        [[[2.0, 0.0]], [[1.0, 5.0]]],
    ])
    assert logits.shape == (3, 2, 1, 2)
    torch.testing.assert_close(majority_vote(logits), torch.tensor([[1, 0]]))


def test_majority_vote_ties_follow_torch_mode():
    gen = torch.Generator().manual_seed(0)
    # 4 members over 4 classes: many pixels split 2-2 or 1-1-1-1.
    logits = torch.randn(4, 4, 6, 6, generator=gen)
    votes = logits.argmax(dim=1)
    voted = majority_vote(logits)
    torch.testing.assert_close(voted, torch.mode(votes, dim=0).values)
    # The official code stacks members on the last axis before torch.mode; same answer.
    torch.testing.assert_close(voted, torch.mode(votes.permute(1, 2, 0), dim=2).values)
    counts = torch.nn.functional.one_hot(votes, 4).sum(0)
    assert (counts.max(-1).values * 2 <= 4).any(), "test data should contain ties"


def test_uncertainty_zero_when_members_agree():
    member = torch.randn(1, 5, 4, 4, generator=torch.Generator().manual_seed(1))
    unc = uncertainty_map(member.repeat(3, 1, 1, 1))
    assert unc.shape == (4, 4)
    torch.testing.assert_close(unc, torch.zeros(4, 4), atol=1e-6, rtol=0)


def test_uncertainty_positive_when_members_disagree():
    # Two confident members on opposite classes: entropy of the mean is ln 2, members' own ~0.
    logits = torch.tensor([[20.0, -20.0], [-20.0, 20.0]]).reshape(2, 2, 1, 1)
    assert uncertainty_map(logits).item() == pytest.approx(math.log(2), abs=1e-6)
    random = torch.randn(3, 4, 5, 5, generator=torch.Generator().manual_seed(2))
    assert (uncertainty_map(random) > 0).all()


def test_uncertainty_matches_categorical_entropies():
    logits = torch.randn(4, 6, 3, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    member_entropy = torch.stack([Categorical(logits=m.permute(1, 2, 0)).entropy() for m in logits])
    mean_probs = torch.softmax(logits, dim=1).mean(0).permute(1, 2, 0)
    expected = Categorical(probs=mean_probs).entropy() - member_entropy.mean(0)
    torch.testing.assert_close(uncertainty_map(logits), expected)


def test_image_uncertainty_score_top_ten_percent():
    unc = torch.arange(100, dtype=torch.float32).reshape(10, 10).flip(0)
    assert image_uncertainty_score(unc) == pytest.approx(94.5)  # mean of 90..99
    assert image_uncertainty_score(unc, top_fraction=0.5) == pytest.approx(74.5)  # mean of 50..99
    # Fewer than 10 pixels: still at least the single largest.
    assert image_uncertainty_score(torch.tensor([1.0, 5.0, 2.0])) == 5.0
    with pytest.raises(ValueError, match="top_fraction"):
        image_uncertainty_score(unc, top_fraction=0.0)


def test_format_iou_table():
    table = format_iou_table([np.nan, 0.5, np.nan, 0.25], ["background", "bed", "lamp", "window"], 0.25,
                             ignore_label=0)
    lines = table.splitlines()
    assert len(lines) == 6
    assert len({len(line) for line in lines}) == 1, "columns should be aligned"
    assert lines[1].split() == ["0", "background", "ignored"]
    assert lines[2].split() == ["1", "bed", "50.00"]
    assert lines[3].split() == ["2", "lamp", "absent"]
    assert lines[-1].split() == ["mIoU", "25.00"]
    with pytest.raises(ValueError, match="class names"):
        format_iou_table([0.5], ["a", "b"], 0.5)
