"""OHIF in a real browser: the bundled viewer shows a study of a real Orthanc, drafts it, and shows the saved SEG.

A person's path, step by step: Orthanc holds a CT series; ``medprompt serve --studies <Orthanc DICOMweb>``
serves the app and MONAI Label's bundled OHIF (at /ohif/, DICOMweb through the server's /proxy/dicom).
In OHIF: the study list, the study's *MONAI Label* mode (three views), the MONAI Label panel connected
to the server and its *Run* (the panel's own ``POST /infer``, painted over the views). Then the draft
is made and saved with the REST calls of that panel's client (``POST /infer/<model>?image=<series
UID>&output=image`` with its NRRD parameters, ``PUT /datastore/label``: the panel has no save button),
which stores a DICOM SEG in Orthanc; OHIF's *Segmentation* mode loads that SEG, lists its classes and
overlays them.

What is checked comes from the page itself (DOM text, OHIF's services) and from screenshots (the
viewport is not blank; coloured overlay pixels appear where there were none). Screenshots go to the
test's folder; with ``MEDPROMPT_OHIF_SCREENSHOTS=DIR`` they are also written to DIR, small, for people
(``MEDPROMPT_OHIF_SCREENSHOTS=docs`` remakes docs/ohif_draft.png and docs/ohif_panel_draft.png).

Skips with the reason when Chromium, websocket-client or Orthanc is missing (``.ci/run`` installs them).
"""

from __future__ import annotations

import io
import json
import os
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import requests

from conftest import console_script, launch_server, serving, write_tiny_checkpoint

pytest.importorskip("websocket", reason="websocket-client is not installed (pip install -r requirements-dev.txt)")
from cdp import Browser, BrowserError, find_chromium  # noqa: E402  (after the skip above)

pytestmark = pytest.mark.skipif(find_chromium() is None,
                                reason="Chromium is not installed (apt-get install -y chromium; .ci/run does)")

MODEL = "medprompt_prior"  # weight-free and quick; OHIF's panel lists every segmentation model alike
SHAPE = (128, 128, 32)
PAGE_TIMEOUT_S = 60.0  # OHIF's first load: ~15 MB of JavaScript, then the series through the proxy
STEP_TIMEOUT_S = 30.0
# What a failure message shows of OHIF's viewports: each engine's viewports with type and slice, and the corner text.
VIEWPORTS_STATE = ("cornerstone.getRenderingEngines().map(e => e.id + ': ' + e.getViewports().map(v => v.id + '/'"
                   " + v.type + '/' + (v.getCurrentImageIdIndex ? v.getCurrentImageIdIndex() : '?')).join(', '))"
                   ".join('; ') + ' | ' + [...document.querySelectorAll('[data-cy=viewport-pane]')]"
                   ".map(p => p.innerText.replace(/\\s+/g, ' ')).join(' | ')")


def standard_orientation(volume):
    """The phantom with rows running to the patient's left and columns to the back, as scanners store CT.

    A phantom's grid is RAS-ordered; written as is, OHIF's stack view would show it upside down.
    """
    from medprompt.io.volume import Volume

    data, affine = np.asarray(volume.data), np.array(volume.affine, dtype=np.float64)
    for axis in (0, 1):
        if affine[axis, axis] > 0:  # this axis runs to the right (i) or the front (j): reverse it
            data = np.flip(data, axis)
            affine[:3, 3] += affine[:3, axis] * (data.shape[axis] - 1)
            affine[:3, axis] *= -1
    return Volume(np.ascontiguousarray(data), affine, volume.source, volume.modality)


@pytest.fixture
def study(orthanc, tmp_path: Path) -> dict:
    """A phantom CT written as a DICOM series and stored in the test's Orthanc: its UIDs."""
    from medprompt.pacs.export import uid, write_series
    from medprompt.phantoms import make_phantom

    volume = standard_orientation(make_phantom(3, SHAPE)[0])
    study_uid = uid("medprompt-ohif-test", "study")
    series_uid = uid(study_uid, "series")
    files = write_series(volume, tmp_path / "series", study_uid=study_uid, series_uid=series_uid,
                         description="OHIF test phantom", patient="OHIF_TEST", modality="CT")
    orthanc.upload(files)
    return {"study": study_uid, "series": series_uid, "dicomweb": orthanc.dicomweb, "slices": len(files),
            "affine": volume.affine}


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Browser]:
    with Browser(width=1400, height=900) as running:
        yield running


# --- screenshots -----------------------------------------------------------------------------------------

def _rgb(png: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(png) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


def _click(browser: Browser, selector: str) -> None:
    """A person's click in the middle of the first element matching ``selector``."""
    x, y = browser.evaluate(f"(() => {{ const r = document.querySelector({json.dumps(selector)})"
                            ".getBoundingClientRect(); return [r.left + r.width / 2, r.top + r.height / 2]; })()")
    browser.click(x, y)


def _region(browser: Browser, selector: str, index: int = 0, inset: float = 0.2) -> tuple[int, int, int, int]:
    """The inner part of an element's box (x0, y0, x1, y1) in page pixels, ``inset`` cut from each side.

    The inset leaves out the viewport's corner texts and orientation markers, which are coloured.
    """
    box = browser.evaluate(f"(() => {{ const r = document.querySelectorAll({json.dumps(selector)})[{index}]"
                           ".getBoundingClientRect(); return [r.left, r.top, r.right, r.bottom]; })()")
    x0, y0, x1, y1 = box
    dx, dy = (x1 - x0) * inset, (y1 - y0) * inset
    return int(x0 + dx), int(y0 + dy), int(x1 - dx), int(y1 - dy)


def _pixels(browser: Browser, path: Path, regions) -> np.ndarray:
    """The pixels of one region, or of several side by side (cut to the lowest), from small clipped screenshots."""
    parts = []
    for n, region in enumerate([regions] if isinstance(regions[0], int) else regions):
        clip = path.with_suffix(f".region{n}.png")
        parts.append(_rgb(browser.screenshot(clip, clip=region)))
    height = min(p.shape[0] for p in parts)
    return np.concatenate([p[:height] for p in parts], axis=1)


def image_shown(pixels: np.ndarray) -> bool:
    """A CT slice is on screen: a good share of bright pixels and real contrast, not a black or flat box."""
    grey = pixels.mean(axis=2)
    return float((grey > 40).mean()) > 0.15 and float(grey.std()) > 20


def coloured(pixels: np.ndarray) -> int:
    """Pixels with clear colour (a segment's overlay); a CT slice is grey (R = G = B)."""
    return int(((pixels.max(axis=2) - pixels.min(axis=2)) > 40).sum())


def _wait_for_pixels(browser: Browser, path: Path, region_of, test, step: str,
                     timeout_s: float = STEP_TIMEOUT_S) -> np.ndarray:
    """Screenshot until ``test(pixels of the region)`` holds; fail naming ``step`` with the last figures."""
    deadline = time.monotonic() + timeout_s
    while True:
        pixels = _pixels(browser, path, region_of())
        if test(pixels):
            browser.screenshot(path)  # the whole page, for people
            return pixels
        if time.monotonic() > deadline:
            grey = pixels.mean(axis=2)
            raise BrowserError(f"step '{step}' timed out after {timeout_s:.0f} s: screenshot {path} shows "
                               f"{(grey > 40).mean():.1%} bright pixels, grey std {grey.std():.1f}, "
                               f"{coloured(pixels)} coloured pixels; the page logged:\n{browser.console_tail()}")
        time.sleep(0.5)


def publish(png: Path, name: str) -> None:
    """Copy a screenshot, shrunk to a small palette PNG, to $MEDPROMPT_OHIF_SCREENSHOTS (when set)."""
    target = os.environ.get("MEDPROMPT_OHIF_SCREENSHOTS")
    if not target:
        return
    from PIL import Image

    with Image.open(png) as image:
        small = image.convert("RGB").resize((image.width * 3 // 4, image.height * 3 // 4), Image.LANCZOS)
        small = small.quantize(colors=128, method=Image.Quantize.MEDIANCUT)
        buffer = io.BytesIO()
        small.save(buffer, format="PNG", optimize=True)
    out = Path(target) / name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(buffer.getvalue())


# --- the tests ---------------------------------------------------------------------------------------------

def test_the_driver_reads_draws_and_names_a_step_that_times_out(browser: Browser, tmp_path: Path) -> None:
    """tests/cdp.py itself, on a page of our own: DOM values, a screenshot's pixels, a clear time-out."""
    page = ("<body style='margin:0;background:#000'><div id=box style='position:absolute;left:100px;top:50px;"
            "width:200px;height:120px;background:rgb(220,40,40)'>x</div>"
            "<script>setTimeout(() => { document.title = 'ready'; console.log('drawn'); }, 300)</script></body>")
    browser.open("data:text/html," + page.replace("#", "%23"))
    assert browser.wait_for("document.title === 'ready' && document.title", "the page sets its title", 10) == "ready"
    box = _region(browser, "#box", inset=0.1)
    assert box == (120, 62, 280, 158)
    pixels = _pixels(browser, tmp_path / "box.png", box)
    assert pixels.shape == (96, 160, 3)
    assert coloured(pixels) == pixels.shape[0] * pixels.shape[1]  # all red
    assert not image_shown(np.zeros_like(pixels)) and coloured(pixels.mean(axis=2, keepdims=True).repeat(3, 2)) == 0
    assert "console.log: drawn" in browser.console_tail()
    with pytest.raises(BrowserError, match=r"step 'a step that never ends' timed out after 1 s.*page state: 'ready'"):
        browser.wait_for("false", "a step that never ends", 1, describe="document.title")
    with pytest.raises(BrowserError, match="JavaScript failed: ReferenceError"):
        browser.evaluate("no_such_name + 1")



def test_ohif_shows_the_study_and_the_saved_draft(study: dict, browser: Browser, tmp_path: Path) -> None:
    checkpoint = write_tiny_checkpoint(tmp_path / "medprompt_tiny.pt")
    env = {**os.environ, "MEDPROMPT_CACHE": str(tmp_path / "cache")}
    command = [str(console_script("medprompt")), "serve", "--conf", "models", "prior"]
    began = time.monotonic()
    with serving(launch_server(tmp_path, command, study["dicomweb"], checkpoint, env)) as server:  # type: ignore[arg-type]
        try:
            print(f"server up after {time.monotonic() - began:.1f} s")
            painted = _study_in_monai_label_mode(browser, server.url, study, tmp_path)
            print(f"study shown, panel drafted: {time.monotonic() - began:.1f} s")
            names, slice_k = _draft_and_save_as_the_panel_does(server.url, study, painted)
            print(f"draft saved as SEG: {time.monotonic() - began:.1f} s")
            _seg_in_segmentation_mode(browser, server.url, study, names, slice_k, tmp_path)
            print(f"SEG shown: {time.monotonic() - began:.1f} s")
        except BrowserError as error:
            browser.screenshot(tmp_path / "ohif_failure.png")
            pytest.fail(f"{error}\n(screenshot: {tmp_path / 'ohif_failure.png'}; server log tail:\n"
                        f"{server.log_tail(15)})")


def _study_in_monai_label_mode(browser: Browser, url: str, study: dict, out: Path) -> dict[str, int]:
    """OHIF's study list leads to MONAI Label mode, which shows the series in three views; its panel drafts it.

    Returns the panel's draft as OHIF holds it: voxels per segment name.
    """
    # The study list at /ohif/ (QIDO-RS through the server's proxy): the study's row, then its mode button.
    browser.open(f"{url}/ohif/")
    row = f"[data-cy='studyRow-{study['study']}']"
    browser.wait_for(f"!!document.querySelector({json.dumps(row)})", "OHIF's study list shows the study", PAGE_TIMEOUT_S)
    mode = f"[data-cy='mode-monai-label-{study['study']}']"
    for attempt in range(3):  # a click that lands while the list still settles may be lost: click again
        _click(browser, row)
        try:
            browser.wait_for(f"!!document.querySelector({json.dumps(mode)})",
                             "a click on the study's row offers MONAI Label mode", 5 * (attempt + 1))
            break
        except BrowserError:
            if attempt == 2:
                raise
    _click(browser, mode)
    browser.wait_for("document.querySelectorAll('[data-cy=viewport-pane] canvas.cornerstone-canvas').length === 3",
                     "OHIF opens the study in three viewports", PAGE_TIMEOUT_S)
    # The series' own slice count in the axial viewport's corner text ("I:20 (20/40)"): this series is loaded.
    browser.wait_for(f"/\\(\\d+\\/{study['slices']}\\)/.test(document.querySelector('[data-cy=viewport-pane]').innerText)",
                     "the axial viewport shows the series' slice counter", STEP_TIMEOUT_S)
    loaded = browser.wait_for(
        "window.services.displaySetService.getActiveDisplaySets().filter(d => d.Modality === 'CT')"
        ".map(d => d.SeriesInstanceUID)", "OHIF lists the CT series", STEP_TIMEOUT_S)
    assert loaded == [study["series"]], f"OHIF shows series {loaded}, not the one stored in Orthanc"
    browser.evaluate("document.querySelector('[data-cy=confirm-and-hide-button]')?.click()")  # the banner
    _wait_for_pixels(browser, out / "ohif_study.png", lambda: _region(browser, "[data-cy=viewport-pane]"),
                     image_shown, "the axial viewport shows the CT image")

    # The MONAI Label panel: the server address typed into its field and the field left (the panel
    # takes the address on blur; its connect button alone would still ask the default :8000), then connect.
    browser.evaluate("(() => { const field = document.getElementById('monailabelServerURL'); field.focus();"
                     f" field.value = {json.dumps(url + '/')}; field.blur(); }})()")
    browser.evaluate("document.querySelector('#monailabelServerURL').closest('tr').querySelector('button').click()")
    browser.wait_for("document.querySelector('.monaiLabelPanel').innerText.includes('MedPrompt Label')",
                     "the MONAI Label panel connects to the server (GET /info/)", STEP_TIMEOUT_S)
    browser.screenshot(out / "ohif_study.png")

    # The panel's own Auto-Segmentation "Run": OHIF posts /infer/<model> and paints the NRRD it gets back.
    mpr = lambda: [_region(browser, "[data-cy=viewport-pane]", n) for n in range(3)]  # noqa: E731
    before = coloured(_pixels(browser, out / "ohif_panel_before.png", mpr()))
    models = browser.evaluate("[...document.querySelectorAll('.monaiLabelPanel select option')].map(o => o.value)")
    assert MODEL in models, f"the panel offers {models}, not {MODEL}"
    # The server serves this one model, so the panel's model list holds only it: Run drafts with it.
    browser.evaluate("[...document.querySelectorAll('.monaiLabelPanel button')].find(b => b.innerText.trim() === 'Run')"
                     ".click()")
    outcome = browser.wait_for("['Running Segmentation - Successful', 'Failed to Run Segmentation']"
                               ".find(t => document.body.innerText.includes(t)) || ''",
                               "the panel's Run drafts the series (POST /infer)", 90)
    assert outcome.endswith("Successful"), f"the panel says: {outcome}"
    _wait_for_pixels(browser, out / "ohif_panel_draft.png", mpr,
                     lambda p: coloured(p) > max(300, 20 * before) and image_shown(p),
                     "the panel's draft is overlaid on the MPR viewports")
    publish(out / "ohif_panel_draft.png", "ohif_panel_draft.png")
    # What the panel painted, per segment name: voxels of OHIF's labelmap, named as its panel names them.
    return browser.evaluate(
        "(() => { const service = window.services.segmentationService;"
        " const data = service.getLabelmapVolume('1').voxelManager.getCompleteScalarDataArray();"
        " const seg = service.getSegmentations().find(s => s.segmentationId === '1');"
        " const counts = {}; for (const v of data) { if (v) counts[v] = (counts[v] || 0) + 1; }"
        " return Object.fromEntries(Object.entries(counts).map(([v, n]) => [seg.segments[v].label, n])); })()")


def _draft_and_save_as_the_panel_does(url: str, study: dict, painted: dict[str, int]) -> tuple[dict[str, int], int]:
    """Draft with the panel's request and save it as a final label (stored in Orthanc as SEG).

    ``painted``: the panel's own draft in OHIF (voxels per segment name); the same request must give
    the same classes with the same voxel counts, so OHIF showed the server's draft under the right names.
    Returns the saved classes (name -> value) and the series slice (0-based, as written) where they
    cover the most voxels.
    """
    info = requests.get(f"{url}/info/", timeout=30).json()
    labels = info["models"][MODEL]["labels"]  # the panel names the returned values with these
    # MonaiLabelClient.infer (OHIF's MONAI Label extension): the series UID as image, NRRD bytes back.
    params = {"result_extension": ".nrrd", "result_dtype": "uint8", "result_compress": False,
              "restore_label_idx": False}
    response = requests.post(f"{url}/infer/{MODEL}", params={"image": study["series"], "output": "image"},
                             files={"params": (None, json.dumps(params))}, timeout=120)
    assert response.status_code == 200, f"infer failed ({response.status_code}): {response.text[:300]}"
    assert response.content.startswith(b"NRRD"), "the panel parses NRRD; the server sent something else"
    draft, header = _nrrd(response.content)
    present = {name: value for name, value in labels.items() if np.any(draft == value)}
    assert {"liver", "spleen"} <= set(present), f"the draft lacks liver or spleen: {present}"
    drafted = {name: int((draft == value).sum()) for name, value in present.items()}
    assert painted == drafted, f"OHIF's panel painted {painted} (voxels per class); the server drafted {drafted}"
    label_info = {"label_info": [{"name": name, "idx": value} for name, value in present.items()]}
    response = requests.put(f"{url}/datastore/label", params={"image": study["series"], "tag": "final"},
                            files={"params": (None, json.dumps(label_info)),
                                   "label": ("label.nrrd", response.content)}, timeout=120)
    assert response.status_code == 200, f"saving the draft failed ({response.status_code}): {response.text[:300]}"
    segs = requests.get(f"{study['dicomweb']}/studies/{study['study']}/series", params={"Modality": "SEG"},
                        timeout=30)
    assert segs.status_code == 200 and segs.json(), "no DICOM SEG series in Orthanc after saving the label"
    return present, _series_slice(study, header, int(np.argmax((draft > 0).sum(axis=(0, 1)))))


def _series_slice(study: dict, header: dict, k: int) -> int:
    """The written series' slice (0-based) at the position of the NRRD's slice ``k`` (both in LPS mm)."""
    position = np.asarray(header["space origin"], float) + k * np.asarray(header["space directions"], float)[2]
    lps = np.diag([-1.0, -1.0, 1.0]) @ np.asarray(study["affine"], float)[:3]
    step = lps[:, 2]
    series_k = float(np.dot(position - lps[:, 3], step) / np.dot(step, step))
    assert abs(series_k - round(series_k)) < 0.05, f"the draft's slice {k} lies between the series' slices"
    return int(round(series_k))


def _nrrd(content: bytes) -> tuple[np.ndarray, dict]:
    import nrrd

    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"medprompt_ohif_{os.getpid()}.nrrd"
    path.write_bytes(content)
    try:
        data, header = nrrd.read(str(path))
    finally:
        path.unlink(missing_ok=True)
    return np.asarray(data), header


def _seg_in_segmentation_mode(browser: Browser, url: str, study: dict, names: dict[str, int], slice_k: int,
                              out: Path) -> None:
    """OHIF's segmentation mode loads the stored SEG: its panel lists the classes and the viewport is overlaid."""
    browser.open(f"{url}/ohif/segmentation?StudyInstanceUIDs={study['study']}")
    browser.wait_for("!!document.querySelector('[data-cy=viewport-pane] canvas.cornerstone-canvas')",
                     "OHIF opens the study again", PAGE_TIMEOUT_S)
    browser.evaluate("document.querySelector('[data-cy=confirm-and-hide-button]')?.click()")
    browser.wait_for("[...document.querySelectorAll('[data-cy=study-browser-thumbnail-no-image]')]"
                     ".some(e => e.innerText.includes('SEG'))", "the study browser lists the stored SEG", STEP_TIMEOUT_S)
    # The slice with the most segmented voxels, found by its SOP instance UID among the viewport's images.
    from medprompt.pacs.export import uid

    slice_uid = uid(study["series"], str(slice_k))  # as write_series names slice k
    index = browser.wait_for(
        "(() => { const v = cornerstone.getRenderingEngines()[0].getViewports()[0];"
        f" const i = v.getImageIds().findIndex(id => id.includes({json.dumps(slice_uid)})); return i >= 0 ? i + 1 : 0; }})()",
        "the viewport holds the series' images", STEP_TIMEOUT_S) - 1
    viewport = lambda: _region(browser, "[data-cy=viewport-pane]")  # noqa: E731
    before = _wait_for_pixels(browser, out / "ohif_before_seg.png", viewport, image_shown,
                              "the CT is shown before the SEG is loaded")  # its first slice: grey, uncoloured

    # A double click on the SEG in the study browser, then "Yes" to OHIF's question, as a person does.
    browser.evaluate("[...document.querySelectorAll('[data-cy=study-browser-thumbnail-no-image]')]"
                     ".find(e => e.innerText.includes('SEG')).dispatchEvent("
                     "new MouseEvent('dblclick', {bubbles: true, cancelable: true, view: window}))")
    browser.wait_for("[...document.querySelectorAll('button')].some(b => b.innerText.trim() === 'Yes')",
                     "OHIF asks whether to open the segmentation", STEP_TIMEOUT_S)
    browser.evaluate("[...document.querySelectorAll('button')].find(b => b.innerText.trim() === 'Yes').click()")
    listed = browser.wait_for(
        "(() => { const s = window.services.segmentationService.getSegmentations();"
        " return s.length ? Object.values(s[0].segments).filter(Boolean).map(x => x.label) : null; })()",
        "OHIF loads the SEG as a segmentation", STEP_TIMEOUT_S)
    assert sorted(listed) == sorted(names), f"OHIF's segmentation holds {listed}, the saved label {sorted(names)}"
    panel = browser.wait_for(
        "(() => { const t = document.body.innerText; return " + " && ".join(
            f"t.includes({json.dumps(name)})" for name in names) + " ? t : ''; })()",
        "the segmentation panel lists every class name", STEP_TIMEOUT_S)
    assert "Segmentation" in panel
    _scroll_to(browser, index, "the viewport scrolls to the segmented slice")
    after = _wait_for_pixels(browser, out / "ohif_draft.png", viewport,
                             lambda p: coloured(p) > max(400, 20 * coloured(before)) and image_shown(p),
                             "the viewport overlays the segmentation in colour")
    assert coloured(before) < 200, f"{coloured(before)} coloured pixels before the SEG was loaded"
    assert coloured(after) > 400
    publish(out / "ohif_draft.png", "ohif_draft.png")


def _scroll_to(browser: Browser, index: int, step: str, timeout_s: float = STEP_TIMEOUT_S) -> None:
    """Bring slice ``index`` (0-based) into the first viewport, reading its corner text "I:n (n/N)".

    A jump through cornerstone's API, then wheel turns as a person scrolls: OHIF may still be setting
    the viewport up (and reset it), and a jump alone was seen not to be drawn, so the shown number counts.
    """
    x0, y0, x1, y1 = _region(browser, "[data-cy=viewport-pane]")
    x, y = (x0 + x1) / 2, (y0 + y1) / 2
    shown = "document.querySelector('[data-cy=viewport-pane]').innerText.match(/I:(\\d+) \\(/)"
    current = f"(() => {{ const m = {shown}; return m ? Number(m[1]) : 0; }})()"
    sign, deadline = 1.0, time.monotonic() + timeout_s
    # First a jump, which is quick and mostly enough; the wheel then finishes the way (one turn makes
    # a jump that was taken but not drawn show up).
    jump = time.monotonic() + 3.0
    while time.monotonic() < jump and browser.evaluate(current) != index + 1:
        browser.evaluate("(() => { const v = cornerstone.getRenderingEngines()[0].getViewports()[0];"
                         f" if (v.getCurrentImageIdIndex() !== {index}) v.setImageIdIndex({index}); }})()")
        time.sleep(0.2)
    while True:
        now = browser.evaluate(current)
        if now == index + 1:
            return
        if time.monotonic() > deadline:
            raise BrowserError(f"step '{step}' timed out after {timeout_s:.0f} s: the viewport shows slice "
                               f"{now}, not {index + 1}; viewports: {browser.evaluate(VIEWPORTS_STATE)}")
        if not now:  # no slice number yet: the viewport is still being set up
            time.sleep(0.2)
            continue
        browser.wheel(x, y, sign * 100 * (1 if index + 1 > now else -1))
        moved = time.monotonic() + 2.0
        while (after := browser.evaluate(current)) == now and time.monotonic() < moved:
            time.sleep(0.05)
        if after and abs(index + 1 - after) > abs(index + 1 - now):
            sign = -sign  # this viewer scrolls the other way round
