"""MTCNN face detection with five landmarks, batched over frames, in plain torch.

A port of the detection procedure of facenet-pytorch 2.6.0
(``facenet_pytorch/models/utils/detect_face.py``), itself a port of Zhang et al.'s
MTCNN, with the networks of ``stages.vision.mtcnn_nets`` and the converted weights in
``weights/mtcnn.pt`` (see ``weights/PROVENANCE.md``). Neither facenet-pytorch nor
torchvision is needed at run time; NMS is implemented here.

``detect`` runs the full cascade:

1. PNet over an image pyramid (scales 12 / min_face_px * factor^k while the short side
   stays >= 12 px; ``cv2.resize`` INTER_AREA on CPU, the crop sampler below elsewhere):
   one call per scale for all frames of the same size. Every output cell scoring >=
   thresholds[0] proposes its 12x12 window; NMS (IoU 0.5) per scale and frame, then NMS
   (IoU 0.7) per frame over all scales; the window is moved by the PNet offsets and
   made square.
2. RNet, one call over the 24x24 crops of all frames' candidates: keep >= thresholds[1],
   NMS (IoU 0.7) per frame, apply the offsets, make square.
3. ONet, one call over the 48x48 crops: keep >= thresholds[2], decode the landmarks in
   the crop, apply the offsets, NMS per frame with overlap = intersection / smaller area
   (> 0.7), which drops a small box inside a larger one.

``verify`` runs step 3 alone on given boxes; the tracker uses it to follow a face
between full detections.

Coordinates are continuous pixels: pixel (col, row) covers [col, col + 1) x [row, row + 1),
so its centre is at (col + 0.5, row + 0.5). Crops are exact area averages over the
square box (a summed-area table sampled bilinearly: ``cv2.INTER_AREA`` at fractional
corners), with zeros outside the frame as the original MTCNN pads them, and the
landmarks and offsets are decoded relative to that same box. facenet-pytorch instead
truncates the box to integers, clips it to the frame (stretching faces at the border)
and decodes relative to the untruncated box, which shifts its outputs by up to 1 px
right and down; it also scales the PNet offsets by the window side minus one. Boxes
and landmarks of the two agree to about 1-3 px on a 110 px face (weights/PROVENANCE.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import nn

from stages.vision.mtcnn_nets import load_mtcnn_nets

DEFAULT_WEIGHTS = Path(__file__).resolve().parent / "weights" / "mtcnn.pt"
"""The converted weights shipped with the package (see weights/PROVENANCE.md)."""

PNET_WINDOW, PNET_STRIDE = 12, 2
"""PNet scores 12x12 windows every 2 pixels of the scaled image."""
RNET_SIZE, ONET_SIZE = 24, 48
"""Crop sides RNet and ONet take."""
MAX_CROPS_PER_CALL = 1024
"""Most crops per RNet/ONet call; more are chunked (a 24x24 RNet batch of 1024 needs ~60 MB)."""
PNET_NMS_PER_SCALE, PNET_NMS, RNET_NMS, ONET_NMS_MIN = 0.5, 0.7, 0.7, 0.7
"""NMS thresholds of the reference: IoU within a scale, IoU across scales, IoU after RNet,
intersection over the smaller area after ONet."""


@dataclass(frozen=True, slots=True)
class FaceDetection:
    """One face in input pixels (continuous coordinates, see the module docstring)."""

    box: tuple[float, float, float, float]
    """x, y, w, h of the ONet-refined box; not necessarily square."""
    score: float
    """ONet face probability, 0..1."""
    landmarks: tuple[tuple[float, float], ...]
    """Five (x, y): left eye, right eye, nose, left mouth corner, right mouth corner, where
    "left" means image left (the subject's right), as MTCNN orders them."""


def overlap(a: torch.Tensor, b: torch.Tensor, over_min_area: bool) -> torch.Tensor:
    """``[len(a), len(b)]`` overlap of (x0, y0, x1, y1) boxes: IoU, or intersection / smaller area."""
    area_a = (a[:, 2] - a[:, 0]).clamp(min=0) * (a[:, 3] - a[:, 1]).clamp(min=0)
    area_b = (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)
    corner_min = torch.maximum(a[:, None, :2], b[None, :, :2])
    corner_max = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (corner_max - corner_min).clamp(min=0).prod(dim=2)
    if over_min_area:
        return inter / torch.minimum(area_a[:, None], area_b[None, :]).clamp(min=1e-9)
    return inter / (area_a[:, None] + area_b[None, :] - inter).clamp(min=1e-9)


def nms(boxes: torch.Tensor, scores: torch.Tensor, threshold: float, groups: torch.Tensor | None = None,
        *, over_min_area: bool = False, block: int = 1024) -> torch.Tensor:
    """Greedy non-maximum suppression; returns the indices kept, best score first.

    ``boxes`` are ``[N, 4]`` (x0, y0, x1, y1). A box is dropped when a kept box of higher
    score (and of the same group, if ``groups`` is given) overlaps it by more than
    ``threshold`` (see ``overlap``). Instead of visiting the boxes one by one, each block
    of ``block`` boxes (in score order) is first cleared against the boxes already kept,
    then iterates "kept = not dropped by a kept, better box of the block" over its overlap
    matrix (Cluster-NMS, Zheng et al. 2020): after k rounds its k best boxes are final,
    and the rounds stop at the fixed point, which is exactly greedy NMS's result, usually
    after a handful of rounds. Blocks bound the memory to ``block`` x (kept + ``block``).
    """
    order = torch.argsort(scores, descending=True, stable=True)
    b = boxes[order]
    g = torch.zeros(len(b), dtype=torch.long, device=b.device) if groups is None else groups[order]
    kept: list[torch.Tensor] = []
    for start in range(0, len(b), block):
        candidates = torch.arange(start, min(start + block, len(b)), device=b.device)
        alive = torch.ones(len(candidates), dtype=torch.bool, device=b.device)
        if kept:
            before = torch.cat(kept)
            drops = (overlap(b[before], b[candidates], over_min_area) > threshold) & (g[before, None] == g[candidates])
            alive = ~drops.any(dim=0)
        drops = (overlap(b[candidates], b[candidates], over_min_area) > threshold).triu(diagonal=1)
        drops = (drops & (g[candidates, None] == g[candidates])).to(b.dtype)  # [i, j]: better i drops j
        keep = alive
        for _ in range(len(candidates)):
            new_keep = alive & ((keep.to(b.dtype) @ drops) == 0)
            if torch.equal(new_keep, keep):
                break
            keep = new_keep
        kept.append(candidates[keep])
    return order[torch.cat(kept)] if kept else torch.empty(0, dtype=torch.long, device=boxes.device)


def square(boxes: torch.Tensor) -> torch.Tensor:
    """Grow ``[N, 4]`` boxes to squares of side max(w, h) about the same centre (MTCNN's rerec)."""
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    half = (boxes[:, 2:] - boxes[:, :2]).amax(dim=1, keepdim=True) / 2
    return torch.cat([centre - half, centre + half], dim=1)


def apply_offsets(boxes: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Move each edge by its offset times the box side (MTCNN's bbreg)."""
    size = (boxes[:, 2:] - boxes[:, :2]).repeat(1, 2)
    return boxes + offsets * size


def integral_image(frame: np.ndarray, device: torch.device) -> torch.Tensor:
    """Summed-area table ``[H + 1, W + 1, 3]`` of an H x W x 3 frame (float64: exact for 8-bit) on ``device``."""
    if device.type == "cpu":
        return torch.from_numpy(cv2.integral(frame, sdepth=cv2.CV_64F))  # ~20x faster than torch.cumsum
    # torch.from_numpy refuses negative strides, as in a mirrored view of a frame.
    return integral_image_torch(torch.from_numpy(np.ascontiguousarray(frame)).to(device))


def integral_image_torch(pixels: torch.Tensor) -> torch.Tensor:
    """``integral_image`` for an H x W x 3 tensor already on an accelerator."""
    table = pixels.double().cumsum(0).cumsum(1)
    return torch.nn.functional.pad(table, (0, 0, 1, 0, 1, 0))


def area_resample(table: torch.Tensor, boxes: torch.Tensor, out_h: int, out_w: int) -> torch.Tensor:
    """Resize each box of the frame behind ``table`` to ``[N, 3, out_h, out_w]`` float32 by area averaging.

    The integral of a piecewise-constant image is bilinear inside every pixel, so sampling
    the summed-area table bilinearly at the output cells' corners gives each cell's exact
    sum for fractional corners too; clamping the corners to the frame makes the outside
    count as zeros. The result is channels_last in memory, as the networks want it.
    """
    height, width = table.shape[0] - 1, table.shape[1] - 1
    b = boxes.to(table.dtype)
    steps_y = torch.linspace(0, 1, out_h + 1, device=table.device, dtype=table.dtype)
    steps_x = torch.linspace(0, 1, out_w + 1, device=table.device, dtype=table.dtype)
    ys = (b[:, 1:2] + (b[:, 3:4] - b[:, 1:2]) * steps_y).clamp(0, height)
    xs = (b[:, 0:1] + (b[:, 2:3] - b[:, 0:1]) * steps_x).clamp(0, width)
    top = ys.floor().clamp(max=height - 1)
    left = xs.floor().clamp(max=width - 1)
    fy, fx = (ys - top)[:, :, None, None], (xs - left)[:, None, :, None]
    index = (top.long() * (width + 1))[:, :, None] + left.long()[:, None, :]
    flat = table.view(-1, 3)

    def at(offset: int) -> torch.Tensor:  # index_select on rows beats advanced indexing ~1.3x on CPU
        return flat.index_select(0, (index + offset).view(-1)).view(*index.shape, 3)

    top_left, top_right, bottom_left, bottom_right = at(0), at(1), at(width + 1), at(width + 2)
    upper = top_left + fx * (top_right - top_left)
    lower = bottom_left + fx * (bottom_right - bottom_left)
    corner = upper + fy * (lower - upper)
    sums = corner[:, 1:, 1:] - corner[:, :-1, 1:] - corner[:, 1:, :-1] + corner[:, :-1, :-1]
    cell_area = ((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) / (out_h * out_w))[:, None, None, None]
    return (sums / cell_area).float().permute(0, 3, 1, 2)


def normalise(pixels: torch.Tensor) -> torch.Tensor:
    """MTCNN's input scaling of 0..255 values to about [-1, 1]."""
    return (pixels - 127.5) * 0.0078125


def check_frames(frames: list[np.ndarray]) -> None:
    """TypeError unless ``frames`` is a list, ValueError naming the first frame that is not H x W x 3 uint8."""
    if not isinstance(frames, (list, tuple)):
        raise TypeError(f"frames must be a list of H x W x 3 uint8 RGB arrays, got {type(frames).__name__}")
    for i, frame in enumerate(frames):
        if not (isinstance(frame, np.ndarray) and frame.ndim == 3 and frame.shape[2] == 3
                and frame.dtype == np.uint8 and frame.shape[0] > 0 and frame.shape[1] > 0):
            got = (f"shape {frame.shape} dtype {frame.dtype}" if isinstance(frame, np.ndarray)
                   else type(frame).__name__)
            raise ValueError(f"frame {i}: expected an H x W x 3 uint8 RGB array, got {got}")


class MTCNN:
    """The MTCNN cascade on ``device``; see the module docstring for the procedure."""

    def __init__(self, weights: Path | None = None, device: torch.device | str = "cpu", *,
                 min_face_px: float = 40, pyramid_factor: float = 0.709,
                 thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7)) -> None:
        if not min_face_px > 0:
            raise ValueError(f"min_face_px must be > 0, got {min_face_px}")
        if not 0 < pyramid_factor < 1:
            raise ValueError(f"pyramid_factor must be in (0, 1), got {pyramid_factor}")
        if len(thresholds) != 3 or not all(0 <= t <= 1 for t in thresholds):
            raise ValueError(f"thresholds must be three probabilities (PNet, RNet, ONet), got {thresholds}")
        self.device = torch.device(device)
        self.min_face_px = float(min_face_px)
        self.pyramid_factor = float(pyramid_factor)
        self.thresholds = tuple(float(t) for t in thresholds)
        self.pnet, self.rnet, self.onet = load_mtcnn_nets(DEFAULT_WEIGHTS if weights is None else weights,
                                                          self.device)

    def scales(self, height: int, width: int) -> list[float]:
        """Pyramid scales: the first maps min_face_px to PNet's 12 px window."""
        scale = PNET_WINDOW / self.min_face_px
        side = min(height, width) * scale
        out = []
        while side >= PNET_WINDOW:
            out.append(scale)
            scale *= self.pyramid_factor
            side *= self.pyramid_factor
        return out

    def scaled(self, frames: list[np.ndarray], tables: list[torch.Tensor], scale: float) -> torch.Tensor:
        """Equal-size ``frames`` resized by ``scale`` (INTER_AREA), normalised, as ``[N, 3, h, w]``."""
        height, width = frames[0].shape[:2]
        out_h, out_w = math.ceil(height * scale), math.ceil(width * scale)
        if self.device.type == "cpu":
            resized = np.stack([cv2.resize(f, (out_w, out_h), interpolation=cv2.INTER_AREA) for f in frames])
            return normalise(torch.from_numpy(resized).permute(0, 3, 1, 2).float())
        whole = torch.tensor([[0.0, 0.0, width, height]], device=self.device)
        return normalise(torch.cat([area_resample(t, whole, out_h, out_w) for t in tables]))

    def propose(self, frames: list[np.ndarray], tables: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """PNet stage: square candidate boxes ``[M, 4]`` and their frame indices ``[M]``."""
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, frame in enumerate(frames):
            by_shape.setdefault(frame.shape, []).append(i)
        boxes, scores, offsets, frame_of = [], [], [], []
        for indices in by_shape.values():
            group_frames = [frames[i] for i in indices]
            group_ids = torch.tensor(indices, device=self.device)
            for scale in self.scales(*group_frames[0].shape[:2]):
                prob, reg = self.pnet(self.scaled(group_frames, [tables[i] for i in indices], scale))
                hit = (prob >= self.thresholds[0]).nonzero()
                if len(hit) == 0:
                    continue
                n, row, col = hit.unbind(1)
                # The reference's window corners: 1-based pixel 2 * cell + 1 (and + 12) divided
                # by the scale, floored; minus one turns its 1-based corner into ours.
                cell = torch.stack([col, row], dim=1).to(prob.dtype) * PNET_STRIDE
                top_left = torch.floor((cell + 1) / scale) - 1
                bottom_right = torch.floor((cell + PNET_WINDOW) / scale)
                scale_boxes = torch.cat([top_left, bottom_right], dim=1)
                scale_scores = prob[n, row, col]
                keep = nms(scale_boxes, scale_scores, PNET_NMS_PER_SCALE, n)
                boxes.append(scale_boxes[keep])
                scores.append(scale_scores[keep])
                offsets.append(reg[n[keep], :, row[keep], col[keep]])
                frame_of.append(group_ids[n[keep]])
        if not boxes:
            return torch.empty(0, 4, device=self.device), torch.empty(0, dtype=torch.long, device=self.device)
        all_boxes, all_frames = torch.cat(boxes), torch.cat(frame_of)
        keep = nms(all_boxes, torch.cat(scores), PNET_NMS, all_frames)
        return square(apply_offsets(all_boxes[keep], torch.cat(offsets)[keep])), all_frames[keep]

    def on_crops(self, net: nn.Module, tables: list[torch.Tensor], boxes: torch.Tensor, frame_of: torch.Tensor,
                 size: int) -> tuple[torch.Tensor, ...]:
        """``net`` on the normalised ``size`` x ``size`` crops of ``boxes``, each cut from its own frame.

        One call for up to MAX_CROPS_PER_CALL boxes (any realistic batch), chunks beyond
        that to bound memory, as the reference does at 512.
        """
        outputs = []
        for start in range(0, len(boxes), MAX_CROPS_PER_CALL):
            chunk, chunk_frames = boxes[start:start + MAX_CROPS_PER_CALL], frame_of[start:start + MAX_CROPS_PER_CALL]
            crops = torch.empty(len(chunk), 3, size, size, device=self.device, memory_format=torch.channels_last)
            for i, table in enumerate(tables):
                mine = (chunk_frames == i).nonzero().squeeze(1)
                if len(mine):
                    crops[mine] = area_resample(table, chunk[mine], size, size)
            outputs.append(net(normalise(crops)))
        return tuple(torch.cat(parts) for parts in zip(*outputs))

    def refine(self, tables: list[torch.Tensor], boxes: torch.Tensor,
               frame_of: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """RNet stage: surviving candidates, offset and made square, with their frame indices."""
        prob, reg = self.on_crops(self.rnet, tables, boxes, frame_of, RNET_SIZE)
        passed = prob >= self.thresholds[1]
        boxes, prob, reg, frame_of = boxes[passed], prob[passed], reg[passed], frame_of[passed]
        keep = nms(boxes, prob, RNET_NMS, frame_of)
        return square(apply_offsets(boxes[keep], reg[keep])), frame_of[keep]

    def output(self, tables: list[torch.Tensor], boxes: torch.Tensor,
               frame_of: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """ONet on square ``boxes``: face probability ``[M]``, refined boxes ``[M, 4]``, landmarks ``[M, 5, 2]``."""
        prob, reg, marks = self.on_crops(self.onet, tables, boxes, frame_of, ONET_SIZE)
        # Landmarks are fractions of the crop ONet saw: five x, then five y.
        side = (boxes[:, 2:] - boxes[:, :2])[:, None, :]
        landmarks = boxes[:, None, :2] + torch.stack([marks[:, :5], marks[:, 5:]], dim=2) * side
        return prob, apply_offsets(boxes, reg), landmarks

    def integral_images(self, frames: list[np.ndarray]) -> list[torch.Tensor]:
        return [integral_image(f, self.device) for f in frames]

    @torch.inference_mode()
    def detect(self, frames: list[np.ndarray]) -> list[list[FaceDetection]]:
        """Faces in each H x W x 3 uint8 RGB frame, largest first; RNet and ONet run once for the batch."""
        check_frames(frames)
        results: list[list[FaceDetection]] = [[] for _ in frames]
        if not frames:
            return results
        tables = self.integral_images(frames)
        boxes, frame_of = self.propose(frames, tables)
        if len(boxes):
            boxes, frame_of = self.refine(tables, boxes, frame_of)
        if len(boxes) == 0:
            return results
        prob, refined, landmarks = self.output(tables, boxes, frame_of)
        passed = prob >= self.thresholds[2]
        prob, refined, landmarks, frame_of = prob[passed], refined[passed], landmarks[passed], frame_of[passed]
        keep = nms(refined, prob, ONET_NMS_MIN, frame_of, over_min_area=True)
        for i, score, box, marks in zip(frame_of[keep].tolist(), prob[keep].tolist(), refined[keep].tolist(),
                                        landmarks[keep].tolist()):
            results[i].append(to_detection(box, score, marks))
        for faces in results:
            faces.sort(key=lambda face: face.box[2] * face.box[3], reverse=True)
        return results

    @torch.inference_mode()
    def verify(self, frames: list[np.ndarray],
               boxes: list[list[tuple[float, float, float, float]]]) -> list[list[FaceDetection | None]]:
        """ONet alone, in one call, on the given (x, y, w, h) boxes made square.

        Returns, per frame and box, the refined face if ONet scores it >= thresholds[2], else None.
        """
        check_frames(frames)
        if not isinstance(boxes, (list, tuple)) or len(boxes) != len(frames):
            raise ValueError(f"boxes must hold one list of (x, y, w, h) per frame ({len(frames)}), got {boxes!r}")
        flat, frame_of = [], []
        for i, frame_boxes in enumerate(boxes):
            for box in frame_boxes:
                if len(box) != 4 or not all(math.isfinite(v) for v in box) or not (box[2] > 0 and box[3] > 0):
                    raise ValueError(f"frame {i}: box {box!r} is not a finite (x, y, w, h) with w, h > 0")
                x, y, w, h = (float(v) for v in box)
                flat.append((x, y, x + w, y + h))
                frame_of.append(i)
        results: list[list[FaceDetection | None]] = [[] for _ in frames]
        if not flat:
            return results
        corners = square(torch.tensor(flat, dtype=torch.float32, device=self.device))
        frame_index = torch.tensor(frame_of, device=self.device)
        prob, refined, landmarks = self.output(self.integral_images(frames), corners, frame_index)
        for i, score, box, marks in zip(frame_of, prob.tolist(), refined.tolist(), landmarks.tolist()):
            results[i].append(to_detection(box, score, marks) if score >= self.thresholds[2] else None)
        return results


def to_detection(corners: list[float], score: float, landmarks: list[list[float]]) -> FaceDetection:
    x0, y0, x1, y1 = corners
    return FaceDetection(box=(x0, y0, x1 - x0, y1 - y0), score=score,
                         landmarks=tuple((x, y) for x, y in landmarks))
