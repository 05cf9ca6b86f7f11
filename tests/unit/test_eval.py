from __future__ import annotations

import copy
import math

import pytest

from rkbench.eval.coco import KEYS, coco_metrics, per_class_ap
from rkbench.eval.counts import count_table, highest_false


def _gt(boxes: list[tuple[int, int, list[float]]], crowd: tuple[int, ...] = ()) -> dict:
    """boxes: (image_id, category_id, [x, y, w, h]); images 640x480."""
    image_ids = sorted({b[0] for b in boxes})
    return {
        "images": [{"id": i, "width": 640, "height": 480, "file_name": f"{i}.jpg"} for i in image_ids],
        "categories": [{"id": 1, "name": "person"}, {"id": 2, "name": "car"}],
        "annotations": [{"id": n + 1, "image_id": img, "category_id": cat, "bbox": box, "area": box[2] * box[3],
                         "iscrowd": int(n in crowd)} for n, (img, cat, box) in enumerate(boxes)],
    }


# One small (< 32^2), one medium and one large object, so every COCO area range has ground truth.
SIZED = _gt([(1, 1, [10, 10, 20, 20]), (2, 2, [100, 100, 50, 50]), (3, 1, [50, 50, 200, 200])])


def _perfect(gt: dict) -> list[dict]:
    return [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": list(a["bbox"]), "score": 0.9}
            for a in gt["annotations"]]


def test_perfect_detections_score_one_on_every_metric():
    m = coco_metrics(SIZED, _perfect(SIZED))
    assert tuple(m) == KEYS == ("map50_95", "map50", "map75", "map_small", "map_medium", "map_large",
                                "ar1", "ar10", "ar100")
    assert all(v == pytest.approx(1.0) for v in m.values()), m


def test_shifted_boxes_lower_the_strict_metrics_first():
    dets = _perfect(SIZED)
    for d in dets:                         # shift by 20% of the width: IoU ~ 0.67
        d["bbox"][0] += 0.2 * d["bbox"][2]
    m = coco_metrics(SIZED, dets)
    assert m["map50"] == pytest.approx(1.0)
    assert m["map75"] == pytest.approx(0.0)
    assert m["map50_95"] == pytest.approx(0.4)      # IoU 0.67 passes 4 of the 10 thresholds 0.5:0.95


def test_no_detections_is_zero_not_a_crash():
    m = coco_metrics(SIZED, [])
    assert set(m) == set(KEYS)
    assert all(v == 0.0 for v in m.values()), m


def test_area_range_without_ground_truth_is_nan_and_inputs_are_left_alone():
    gt = _gt([(1, 1, [50, 50, 200, 200])])          # one large object: no small / medium ground truth
    dets = _perfect(gt) + [{"image_id": 77, "category_id": 1, "bbox": [0, 0, 5, 5], "score": 0.99}]
    gt_before, dets_before = copy.deepcopy(gt), copy.deepcopy(dets)
    m = coco_metrics(gt, dets)                     # image 77 is not in the ground truth: ignored
    assert m["map_large"] == pytest.approx(1.0) and m["map50_95"] == pytest.approx(1.0)
    assert math.isnan(m["map_small"]) and math.isnan(m["map_medium"])
    assert gt == gt_before and dets == dets_before


def test_gt_without_area_iscrowd_or_ids_is_accepted():
    gt = {"images": [{"id": 5, "width": 64, "height": 64}], "categories": [{"id": 3, "name": "x"}],
          "annotations": [{"image_id": 5, "category_id": 3, "bbox": [4, 4, 40, 40]}]}
    m = coco_metrics(gt, [{"image_id": 5, "category_id": 3, "bbox": [4, 4, 40, 40], "score": 0.5}])
    assert m["map50_95"] == pytest.approx(1.0)



def test_per_class_ap_scores_each_category_by_name():
    gt = _gt([(1, 1, [10, 10, 40, 40]), (2, 2, [100, 100, 50, 50]), (3, 2, [50, 50, 80, 80])])
    gt["categories"].append({"id": 3, "name": "traffic:light"})      # no ground truth; ':' not allowed in MLflow
    dets = _perfect(gt)
    dets[1]["bbox"][0] += 0.2 * dets[1]["bbox"][2]                     # one car shifted: IoU ~ 0.67
    ap = per_class_ap(gt, dets)
    assert list(ap) == ["person", "car", "traffic_light"]
    assert ap["person"] == pytest.approx(1.0)
    # car: AP 1 at the 4 IoU thresholds the shifted box passes; at the other 6 it is a false positive ranked
    # first (equal scores keep their order), so precision is 0.5 up to recall 0.5 (51 of 101 points), then 0
    assert ap["car"] == pytest.approx((4 * 1.0 + 6 * 0.5 * 51 / 101) / 10)
    assert math.isnan(ap["traffic_light"])
    assert per_class_ap(gt, [])["person"] == 0.0
    assert coco_metrics(gt, dets)["map50_95"] == pytest.approx((ap["person"] + ap["car"]) / 2)

def _det(image_id: int, cat: int, box: list[float], score: float) -> dict:
    return {"image_id": image_id, "category_id": cat, "bbox": box, "score": score}


def test_count_table_hand_made_case():
    # image 1: person A, car B, a crowd of persons; image 2: person C.
    gt = _gt([(1, 1, [0, 0, 10, 10]), (1, 2, [20, 20, 10, 10]), (1, 1, [50, 50, 10, 10]), (2, 1, [0, 0, 10, 10])],
             crowd=(2,))
    dets = [
        _det(1, 1, [50, 50, 10, 10], 0.95),   # on the crowd region: crowd is not ground truth -> false
        _det(1, 1, [0, 0, 10, 10], 0.90),     # A -> correct
        _det(1, 1, [0, 0, 10, 10], 0.70),     # duplicate of A (already taken) -> false
        _det(1, 1, [20, 20, 10, 10], 0.60),   # on B but the wrong class -> false, B stays missed
        _det(2, 1, [1, 0, 10, 10], 0.30),     # C with IoU 90/110 = 0.82 -> correct at 0.25 only
        _det(2, 1, [30, 30, 5, 5], 0.10),     # below every threshold
        _det(99, 1, [0, 0, 10, 10], 0.99),    # image not in the ground truth -> ignored
    ]
    rows = count_table(gt, dets)
    got = {r["conf"]: (r["gt"], r["correct"], r["false"], r["missed"]) for r in rows}
    assert got == {0.25: (3, 2, 3, 1), 0.5: (3, 1, 3, 2), 0.63: (3, 1, 2, 2), 0.8: (3, 1, 1, 2)}
    r = rows[0]
    assert list(r) == ["conf", "gt", "correct", "false", "missed", "correct_ratio", "false_ratio", "missed_ratio"]
    assert r["correct_ratio"] == pytest.approx(2 / 3)
    assert r["false_ratio"] == pytest.approx(3 / 5)
    assert r["missed_ratio"] == pytest.approx(1 / 3)


def test_count_table_greedy_by_score_and_iou_threshold():
    gt = _gt([(1, 1, [0, 0, 10, 10]), (1, 1, [8, 0, 10, 10])])
    dets = [
        _det(1, 1, [2, 0, 10, 10], 0.9),   # IoU 0.67 with the first box, 0.25 with the second: takes the first
        _det(1, 1, [0, 0, 10, 10], 0.8),   # best IoU (1.0) was taken by the higher score; second box IoU < 0.5
        _det(1, 1, [8, 0, 10, 10], 0.7),   # exact on the second box
    ]
    (row,) = count_table(gt, dets, thresholds=(0.5,))
    assert (row["correct"], row["false"], row["missed"]) == (2, 1, 0)
    (strict,) = count_table(gt, dets, thresholds=(0.5,), iou=0.7)
    # at IoU 0.7 the 0.9 detection matches nothing, so the 0.8 one takes the first box
    assert (strict["correct"], strict["false"], strict["missed"]) == (2, 1, 0)
    assert count_table(gt, dets[:1], thresholds=(0.5,), iou=0.7)[0]["correct"] == 0


def test_count_table_without_detections_or_ground_truth():
    (row,) = count_table(SIZED, [], thresholds=(0.25,))
    assert (row["gt"], row["correct"], row["false"], row["missed"]) == (3, 0, 0, 3)
    assert (row["correct_ratio"], row["false_ratio"], row["missed_ratio"]) == (0.0, 0.0, 1.0)
    empty = {"images": [{"id": 1, "width": 8, "height": 8}], "annotations": [], "categories": []}
    (row,) = count_table(empty, [_det(1, 1, [0, 0, 4, 4], 0.9)], thresholds=(0.25,))
    assert (row["gt"], row["false"], row["correct_ratio"], row["false_ratio"]) == (0, 1, 0.0, 1.0)


def test_highest_false_is_the_best_scoring_unmatched_detection():
    gt = _gt([(1, 1, [0, 0, 10, 10]), (2, 1, [0, 0, 10, 10])])
    dets = [_det(1, 1, [0, 0, 10, 10], 0.9),     # correct
            _det(1, 1, [0, 0, 10, 10], 0.8),     # duplicate: false, the highest false one
            _det(2, 2, [0, 0, 10, 10], 0.6),     # wrong class: false
            _det(2, 1, [0, 0, 10, 10], 0.5)]     # correct
    assert highest_false(gt, dets) == dets[1]
    assert highest_false(gt, dets, floor=0.85) is None
    assert highest_false(gt, [dets[0], dets[3]]) is None
    # the same matching as the count table: its false count at 0.25 holds the highest false one
    assert count_table(gt, dets, thresholds=(0.25,))[0]["false"] == 2
