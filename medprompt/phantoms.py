"""Synthetic abdominal CT phantoms with exact masks, for demos, tests and the annotation loop.

A phantom is a life-size, non-contrast abdominal CT in patient coordinates: body ellipse with
subcutaneous fat and a muscle wall, spine, ribs, lung bases above the diaphragm, and the
abdominal organs at their usual places (positions from the TotalSegmentator references in
shared/data/real, measured from the vertebral body centre). Each seed varies body size, organ
sizes (+-15 %), organ positions (+-15 mm), slice spacing, table offset and a few degrees of
patient rotation, so a loop over phantoms sees different volumes on different grids.

Phantoms prove that the machinery works end to end (reading, drafting, saving, evaluating,
finetuning); they say nothing about accuracy on real CT, because they embody the same prior
knowledge a prior-based model uses.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from scipy import ndimage

from medprompt.io.volume import Volume, save_labelmap, save_volume

# Synapse 8 in their usual order (1..8), then the extra classes the phantom can draw.
LABELS: dict[str, int] = {
    "aorta": 1,
    "gallbladder": 2,
    "kidney_left": 3,
    "kidney_right": 4,
    "liver": 5,
    "pancreas": 6,
    "spleen": 7,
    "stomach": 8,
    "inferior_vena_cava": 9,
    "urinary_bladder": 10,
    "lungs": 11,
    "bone": 12,
}
DEFAULT_SHAPE = (96, 96, 64)


def make_phantom(seed: int, shape: tuple[int, int, int] = DEFAULT_SHAPE
                 ) -> tuple[Volume, np.ndarray, dict[str, int]]:
    """Build phantom ``seed``: (CT volume in HU on a RAS grid, uint8 labels, name -> value).

    The urinary bladder is in the field of view for about half of the seeds; ``names`` lists
    only the classes that are drawn.
    """
    if len(shape) != 3 or min(shape) < 8:
        raise ValueError(f"phantom shape must be 3 sizes of at least 8, got {shape}")
    return _PhantomBuilder(np.random.default_rng(seed), tuple(int(n) for n in shape)).build()


def write_sample_data(directory: str | os.PathLike, n: int = 4, seed: int = 0,
                      shape: tuple[int, int, int] = DEFAULT_SHAPE) -> list[Path]:
    """Write ``n`` phantoms as ``DIR/phantom_000.nii.gz`` ...; return the image paths.

    Reference masks go to ``DIR/reference/`` (with JSON sidecars), not ``DIR/labels/final``: a
    MONAI Label datastore on DIR must start unlabelled, and it lists only DIR's own files.
    """
    if n < 1:
        raise ValueError("n must be at least 1")
    directory = Path(directory)
    images = []
    for index in range(n):
        volume, labels, names = make_phantom(seed + index, shape)
        name = f"phantom_{index:03d}.nii.gz"
        images.append(save_volume(directory / name, volume))
        save_labelmap(directory / "reference" / name, labels, volume.affine, names)
    return images


def _uniform(rng: np.random.Generator, low: float, high: float) -> float:
    return float(rng.uniform(low, high))


def _rotation(yaw_deg: float = 0.0, pitch_deg: float = 0.0) -> np.ndarray:
    """Rotation about z (yaw) then about x (pitch)."""
    yaw, pitch = np.deg2rad(yaw_deg), np.deg2rad(pitch_deg)
    about_z = np.array([[np.cos(yaw), -np.sin(yaw), 0], [np.sin(yaw), np.cos(yaw), 0], [0, 0, 1]])
    about_x = np.array([[1, 0, 0], [0, np.cos(pitch), -np.sin(pitch)], [0, np.sin(pitch), np.cos(pitch)]])
    return about_x @ about_z


class _PhantomBuilder:
    """Paints one phantom; coordinates are mm in the patient frame, origin at the L1 body centre."""

    def __init__(self, rng: np.random.Generator, shape: tuple[int, int, int]) -> None:
        self.rng = rng
        self.shape = shape
        # Body: skin ellipse half-axes, fat and muscle-wall thickness.
        self.a = _uniform(rng, 145, 180)
        self.b = _uniform(rng, 100, 128)
        self.fat = _uniform(rng, 10, 32)
        self.wall = _uniform(rng, 8, 14)
        self.sx, self.sy = self.a / 165.0, self.b / 115.0  # scale organ offsets with the body
        self.spine_y = -0.35 * self.b
        self.liver_scale = _uniform(rng, 0.85, 1.15)
        self.liver_z = 40.0 + _uniform(rng, -15, 15)
        self.dome_right = self.liver_z + 80.0 * self.liver_scale * 0.85
        self.dome_left = self.dome_right - _uniform(rng, 5, 20)

    # -- geometry ---------------------------------------------------------------------------

    def _grid(self) -> tuple[np.ndarray, np.ndarray]:
        """World affine and patient-frame coordinates (3, *shape) of every voxel centre."""
        rng, shape = self.rng, self.shape
        top = self.dome_right + _uniform(rng, 25, 60)
        self.bladder_z = -215.0 + _uniform(rng, -15, 15)
        self.bladder_scale = _uniform(rng, 0.85, 1.15)
        self.has_bladder = bool(rng.random() < 0.5)
        bladder_half = 35.0 * self.bladder_scale
        if self.has_bladder:
            bottom = self.bladder_z - bladder_half - _uniform(rng, 15, 40)
        else:
            bottom = self.bladder_z + bladder_half + _uniform(rng, 25, 70)
        fov = 2 * self.a + _uniform(rng, 40, 80)
        step = fov / max(shape[0], shape[1])
        spacing = np.array([step, step, (top - bottom) / shape[2]])
        centre_world = np.array([_uniform(rng, -15, 15), _uniform(rng, -15, 15) + 120,
                                 _uniform(rng, -700, -300)])
        affine = np.diag([*spacing, 1.0])
        affine[:3, 3] = centre_world - spacing * (np.array(shape) - 1) / 2
        # The patient sits a little off the field-of-view centre and slightly rotated.
        patient_origin = centre_world + np.array([_uniform(rng, -12, 12), _uniform(rng, -12, 12) - 8,
                                                  -(top + bottom) / 2])
        rotation = _rotation(_uniform(rng, -4, 4), _uniform(rng, -3, 3))
        ijk = np.indices(shape, dtype=np.float32).reshape(3, -1)
        world = affine[:3, :3] @ ijk + affine[:3, 3:4]
        patient = rotation.T @ (world - patient_origin[:, None])
        return affine, patient.reshape(3, *shape).astype(np.float32)

    def _smooth_field(self, sigma_mm: float, spacing: np.ndarray) -> np.ndarray:
        """Unit-variance smooth random field: irregular organ borders and bowel texture."""
        field = ndimage.gaussian_filter(self.rng.standard_normal(self.shape).astype(np.float32),
                                        sigma=sigma_mm / spacing, mode="wrap")
        return field / (field.std() + 1e-6)

    def _at(self, x: float, dy: float, z: float) -> np.ndarray:
        """Organ centre from an offset to the spine (x, anterior dy), scaled to the body, jittered."""
        jitter = self.rng.uniform(-15, 15, 3)
        return np.array([x * self.sx, self.spine_y + dy * self.sy, z]) + jitter

    def _size(self, radii: tuple[float, float, float], scale: float | None = None) -> np.ndarray:
        scale = _uniform(self.rng, 0.85, 1.15) if scale is None else scale
        return np.asarray(radii) * scale * (self.sx * self.sy) ** 0.25

    def _ellipsoid(self, centre: np.ndarray, radii: np.ndarray, yaw: float = 0.0,
                   pitch: float = 0.0) -> np.ndarray:
        """Normalised radius (1 on the surface) of a rotated ellipsoid at every voxel."""
        x, y, z = (self.p[i] - centre[i] for i in range(3))
        r = _rotation(yaw, pitch)  # local axes are r's columns
        q = sum(((r[0, k] * x + r[1, k] * y + r[2, k] * z) / radii[k]) ** 2 for k in range(3))
        return np.sqrt(q)

    def _blob(self, centre: np.ndarray, radii: np.ndarray, yaw: float = 0.0,
              pitch: float = 0.0) -> np.ndarray:
        return self._ellipsoid(centre, radii, yaw, pitch) <= 1.0 + 0.1 * self.wobble

    def _tube(self, nodes: list[tuple[float, float, float, float]]) -> np.ndarray:
        """Voxels within the (linearly varying) radius of a polyline of (x, y, z, radius) nodes."""
        inside = np.zeros(self.shape, dtype=bool)
        for (x0, y0, z0, r0), (x1, y1, z1, r1) in zip(nodes[:-1], nodes[1:]):
            start, end = np.array([x0, y0, z0]), np.array([x1, y1, z1])
            axis = end - start
            rel = [self.p[i] - start[i] for i in range(3)]
            t = np.clip(sum(rel[i] * axis[i] for i in range(3)) / float(axis @ axis), 0.0, 1.0)
            dist2 = sum((rel[i] - t * axis[i]) ** 2 for i in range(3))
            radius = r0 + t * (r1 - r0)
            inside |= dist2 <= (radius * (1 + 0.08 * self.wobble)) ** 2
        return inside

    def _body_radius(self, half_x: float, half_y: float) -> np.ndarray:
        """Normalised radius of the body cross-section: elliptic in front, flatter behind (supine)."""
        power = np.where(self.p[1] < 0, 3.0, 2.0)
        return (np.abs(self.p[0] / half_x) ** power + np.abs(self.p[1] / half_y) ** power) ** (1 / power)

    # -- painting ---------------------------------------------------------------------------

    def _paint(self, mask: np.ndarray, hu: float | np.ndarray, label: int | None = None) -> None:
        """Set HU (and the label, or clear it for unlabelled tissue) where ``mask`` holds."""
        self.hu[mask] = hu[mask] if isinstance(hu, np.ndarray) else hu
        self.labels[mask] = 0 if label is None else label

    def build(self) -> tuple[Volume, np.ndarray, dict[str, int]]:
        rng = self.rng
        affine, self.p = self._grid()
        spacing = np.diag(affine)[:3]
        self.wobble = self._smooth_field(25.0, spacing)
        x, y, z = self.p
        self.hu = np.full(self.shape, -1000.0, dtype=np.float32)
        self.labels = np.zeros(self.shape, dtype=np.uint8)
        jitter_hu = lambda: _uniform(rng, -5, 5)  # noqa: E731 - per-organ mean shift

        # Body wall: subcutaneous fat, muscle, abdominal cavity; CT table under the back.
        skin = self._body_radius(self.a, self.b) <= 1.0
        muscle = self._body_radius(self.a - self.fat, self.b - self.fat) <= 1.0
        inner_a, inner_b = self.a - self.fat - self.wall, self.b - self.fat - self.wall
        cavity = self._body_radius(inner_a, inner_b) <= 1.0
        table = (y < -self.b - 10) & (y > -self.b - 22) & (np.abs(x) < 0.8 * self.a)
        self._paint(table, 250.0)
        self._paint(skin, -100.0 + jitter_hu())
        self._paint(muscle, 45.0 + jitter_hu())
        self._paint(cavity, -90.0)

        # Diaphragm: a dome per side (right higher), lower posteriorly (costophrenic recesses).
        blend = 1.0 / (1.0 + np.exp(-x / 20.0))
        dome = self.dome_left + (self.dome_right - self.dome_left) * blend
        diaphragm = (dome - 0.004 * (y - self.spine_y - 60.0) ** 2
                     - 0.003 * (np.abs(x) - 70.0) ** 2 * (np.abs(x) > 70.0))
        abdomen = cavity & (z < diaphragm)
        thorax = cavity & (z >= diaphragm)

        # Paraspinal muscles and psoas (unlabelled).
        for side in (-1.0, 1.0):
            self._paint(self._in_ellipse(side * 38, self.spine_y - 48, 26, 24) & skin, 50.0)
            psoas_r = 10.0 + np.clip(-z, 0, 150) * 0.08
            psoas = ((x - side * (28 + np.clip(-z, 0, 200) * 0.12)) ** 2 + (y - self.spine_y - 5) ** 2
                     <= psoas_r ** 2) & (z < 0)
            self._paint(psoas, 50.0)

        heart = self._blob(np.array([-15.0, self.spine_y + 95 * self.sy, self.dome_left + 50.0]),
                           np.array([60.0, 45.0, 55.0])) & thorax
        self._paint(heart, 40.0)

        # Solid organs, in painting order: later ones win where shapes overlap.
        liver = (self._blob(self._at(85, 58, self.liver_z), self._size((72, 78, 80), self.liver_scale))
                 | self._blob(self._at(-5, 85, self.liver_z + 20), self._size((55, 30, 38), self.liver_scale)))
        gutter = (np.abs(x) < 45) & (y < self.spine_y + 25)  # crura, adrenals, psoas: not liver
        self._paint(liver & abdomen & ~gutter, 58.0 + jitter_hu(), LABELS["liver"])
        self._stomach(abdomen, jitter_hu())
        # Against the left posterolateral wall, however narrow the body: never clipped to a sliver.
        spleen_c = self._at(-95, -5, 32)
        spleen_c[0] = max(spleen_c[0], -(inner_a - 32))
        spleen = self._blob(spleen_c, self._size((28, 55, 48)), yaw=35)
        self._paint(spleen & abdomen, 48.0 + jitter_hu(), LABELS["spleen"])
        gallbladder = self._blob(self._at(62, 88, 25), self._size((16, 16, 34)), pitch=30)
        self._paint(gallbladder & abdomen, 8.0 + jitter_hu(), LABELS["gallbladder"])
        for name, side, z_mid, yaw in (("kidney_left", -1, 10, 25), ("kidney_right", 1, -8, -25)):
            centre, radii = self._at(side * 72, 0, z_mid), self._size((28, 24, 55))
            shape = self._ellipsoid(centre, radii, yaw=yaw, pitch=side * 8)
            kidney = (shape <= 1.0 + 0.05 * self.wobble) & abdomen
            cortex_hu = np.where(shape > 0.75, 38.0, 28.0).astype(np.float32)
            self._paint(kidney, cortex_hu, LABELS[name])
        scale = _uniform(rng, 0.85, 1.15)
        head, neck, body, tail = (self._at(32, 55, 8), self._at(5, 65, 20), self._at(-40, 58, 28),
                                  self._at(-82, 28, 40))
        pancreas = self._tube([(*head, 17 * scale), (*neck, 12 * scale), (*body, 11 * scale),
                               (*tail, 10 * scale)])
        self._paint(pancreas & abdomen, 38.0 + jitter_hu(), LABELS["pancreas"])
        self._vessels(skin)
        if self.has_bladder:
            bladder = self._blob(self._at(0, 75, self.bladder_z), self._size((45, 35, 35), self.bladder_scale))
            self._paint(bladder & cavity, 8.0 + jitter_hu(), LABELS["urinary_bladder"])
        self._bones(skin, inner_a, inner_b)

        # Bowel loops (unlabelled) in the remaining visceral fat, with a few gas pockets, kept
        # off the organs by a fat plane one voxel wide as on most real scans.
        fat = abdomen & (self.hu == -90.0) & ~ndimage.binary_dilation(self.labels > 0)
        bowel = fat & (self._smooth_field(12.0, spacing) > 0.4)
        self._paint(bowel, 25.0)
        self._paint(bowel & (self._smooth_field(6.0, spacing) > 2.2), -850.0)

        mediastinum = (np.abs(x) < 30) & (y > self.spine_y - 25)
        lungs = thorax & ~heart & ~mediastinum & (self.labels == 0) & (self.hu <= -90.0)
        lung_hu = -850.0 + 25.0 * self._smooth_field(4.0, spacing)
        self._paint(lungs, lung_hu, LABELS["lungs"])

        image = self._scanner(spacing)
        present = {name: value for name, value in LABELS.items() if np.any(self.labels == value)}
        volume = Volume(data=image, affine=affine, source="phantom", modality="CT")
        return volume, self.labels, present

    def _in_ellipse(self, cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
        """Axial ellipse, extruded along z (muscles that run the whole abdomen)."""
        return ((self.p[0] - cx) / rx) ** 2 + ((self.p[1] - cy) / ry) ** 2 <= 1.0

    def _stomach(self, abdomen: np.ndarray, hu_shift: float) -> None:
        """Fundus/body and antrum; swallowed air floats anterior, fluid below, soft-tissue wall."""
        scale = _uniform(self.rng, 0.85, 1.15)
        fundus_c, fundus_r = self._at(-58, 55, 75), self._size((42, 38, 50), scale)
        fundus = self._ellipsoid(fundus_c, fundus_r)
        antrum = self._ellipsoid(self._at(-5, 88, 20), self._size((40, 22, 26), scale), yaw=20)
        stomach = (np.minimum(fundus, antrum) <= 1.0 + 0.08 * self.wobble) & abdomen
        lumen = np.minimum(fundus, antrum) < 0.8
        air = lumen & (self.p[1] > fundus_c[1] + 0.45 * fundus_r[1])
        hu = np.where(lumen, 20.0, 45.0 + hu_shift).astype(np.float32)
        hu[air] = -950.0
        self._paint(stomach, hu, LABELS["stomach"])

    def _vessels(self, skin: np.ndarray) -> None:
        """Aorta (left-anterior of the spine) and IVC (right-anterior), each with iliac branches."""
        top = float(self.p[2].max()) + 20
        s = _uniform(self.rng, 0.9, 1.1)
        sy = lambda dy: self.spine_y + dy * self.sy  # noqa: E731
        aorta = self._tube([(-22, sy(18), top, 10 * s), (-14, sy(28), 100, 10 * s),
                            (-12, sy(32), -110, 9 * s), (-45, sy(22), -210, 6 * s)])
        aorta |= self._tube([(-12, sy(32), -110, 8 * s), (25, sy(22), -210, 6 * s)])
        self._paint(aorta & skin, 42.0 + _uniform(self.rng, -5, 5), LABELS["aorta"])
        ivc = self._tube([(25, sy(62), top, 12 * s), (22, sy(42), 60, 11 * s),
                          (20, sy(38), -115, 10 * s), (42, sy(15), -210, 7 * s)])
        ivc |= self._tube([(20, sy(38), -115, 9 * s), (-28, sy(15), -210, 8 * s)])
        self._paint(ivc & skin & ~aorta, 40.0 + _uniform(self.rng, -5, 5), LABELS["inferior_vena_cava"])

    def _bones(self, skin: np.ndarray, inner_a: float, inner_b: float) -> None:
        """Vertebrae (cortex + marrow, discs between), posterior arches, ribs and iliac wings."""
        x, y, z = self.p
        bone = LABELS["bone"]
        period, phase = 35.0, _uniform(self.rng, 0, 35)
        level = np.mod(z - phase, period)
        in_body_level = level < 27.0  # 8 mm discs in between
        dy = y - self.spine_y
        vertebra = (x / 22.0) ** 2 + (dy / 17.0) ** 2
        self._paint((vertebra <= 1.0) & ~in_body_level, 80.0)  # intervertebral disc
        self._paint((vertebra <= 1.0) & in_body_level,
                    np.where(vertebra > 0.7, 900.0, 420.0).astype(np.float32), bone)
        canal = x ** 2 + (dy + 30) ** 2
        arch = (canal > 9 ** 2) & (canal <= 16 ** 2) & (dy < -22) & (level < 22)
        spinous = (np.abs(x) < 4) & (dy < -40) & (dy > -68) & (level < 20)
        transverse = (np.abs(x) > 15) & (np.abs(x) < 45) & (np.abs(dy + 22) < 5) & (np.abs(level - 10) < 6)
        self._paint((arch | spinous | transverse) & skin, 750.0, bone)
        self._paint((canal <= 9 ** 2) & skin, 15.0)

        # Ribs: elliptic bands just inside the muscle wall, sloping down towards the front;
        # upper ribs reach round to the front, the lowest (floating) ones stay posterolateral.
        rib_a, rib_b = inner_a + 0.5 * self.wall, inner_b + 0.5 * self.wall
        radius = self._body_radius(rib_a, rib_b)
        angle = np.arccos(np.clip(-y / np.sqrt(x ** 2 + y ** 2 + 1e-6), -1, 1))  # 0 at the back
        slope = 35.0 * (angle / np.pi) ** 1.5
        rib_phase = _uniform(self.rng, 0, 28)
        height = z + slope - rib_phase
        rib_index = np.round(height / 28.0)
        reach = np.where(rib_index * 28.0 + rib_phase > 40.0, 0.85 * np.pi, 0.55 * np.pi)
        ribs = ((np.abs(height - rib_index * 28.0) < 4.5) & (np.abs(radius - 1.0) * rib_a < 5.0)
                & (angle > 0.15) & (angle < reach) & (rib_index * 28.0 + rib_phase > -40.0))
        self._paint(ribs & skin, 750.0, bone)

        # Iliac wings low in the abdomen (only in phantoms whose field reaches the pelvis).
        for side in (-1.0, 1.0):
            cx = side * 80.0 * self.sx
            wing = np.sqrt(((x - cx) / 45.0) ** 2 + ((y - self.spine_y - 15) / 65.0) ** 2)
            shell = (np.abs(wing - 1.0) * 45.0 < 4.0) & (side * x > abs(cx) - 10)
            self._paint(shell & (z < -120) & (z > -235) & skin, 700.0, bone)

    def _scanner(self, spacing: np.ndarray) -> np.ndarray:
        """Partial-volume blur, then correlated quantum noise; integer HU like a real CT."""
        blurred = ndimage.gaussian_filter(self.hu, sigma=0.6)
        noise = ndimage.gaussian_filter(self.rng.standard_normal(self.shape).astype(np.float32), 0.7)
        sigma = _uniform(self.rng, 10, 18)
        image = blurred + noise * (sigma / (noise.std() + 1e-6))
        return np.round(np.clip(image, -1024, 3071)).astype(np.float32)
