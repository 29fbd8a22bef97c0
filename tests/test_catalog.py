"""The prompt catalog: shipped classes, resolution of names and free text, and file validation."""

from __future__ import annotations

from pathlib import Path

import pytest

from medprompt.catalog import SYNAPSE8, PromptCatalog, default_catalog, parse_prompt_file
from medprompt.errors import PromptError

REQUIRED = set(SYNAPSE8) | {
    "esophagus", "inferior_vena_cava", "portal_vein_and_splenic_vein", "adrenal_gland_left",
    "adrenal_gland_right", "liver_tumour", "colon_tumour", "body", "lungs", "bone", "urinary_bladder",
}

GOOD = """name: {name}
aliases: [my alias]
descriptions: [A structure somebody cares about.]
prior:
  supported: true
  method: organ
  ct: {{hu: [0, 100]}}
  location: {{x: [-10, 10], y: [0, 50]}}
  volume_ml: [1, 10]
"""


@pytest.fixture(scope="module")
def catalog() -> PromptCatalog:
    return default_catalog()


def test_shipped_catalog_has_the_required_classes_with_several_descriptions(catalog):
    assert REQUIRED <= set(catalog.names)
    for name in REQUIRED:
        entry = catalog[name]
        assert len(entry.descriptions) >= 2 or name in ("body",), name
        assert entry.aliases, name
    # The tumours are honest about the prior; every anatomical class has prior attributes.
    assert not catalog["liver_tumour"].prior_supported and "tumour" in catalog["liver_tumour"].prior["note"]
    for name in REQUIRED - {"liver_tumour", "colon_tumour"}:
        assert catalog[name].prior_supported, name


@pytest.mark.parametrize(
    "text, expected",
    [
        ("liver", "liver"),
        ("Liver", "liver"),
        ("  LIVER ", "liver"),
        ("left kidney", "kidney_left"),
        ("Right-Kidney", "kidney_right"),
        ("kidney_right", "kidney_right"),
        ("IVC", "inferior_vena_cava"),
        ("gall bladder", "gallbladder"),
        ("the kidney filters blood", "kidneys"),
        ("The kidney filters blood to produce urine", "kidneys"),
        ("the left kidney filters blood", "kidney_left"),
        ("organ that stores bile", "gallbladder"),
        ("bladder", "urinary_bladder"),
        ("oesophagus", "esophagus"),
        ("liver tumor", "liver_tumour"),
    ],
)
def test_resolution_by_name_alias_and_free_text(catalog, text, expected):
    assert catalog.resolve(text).name == expected


def test_unknown_prompt_names_the_prompt_and_closest_classes(catalog):
    with pytest.raises(PromptError) as err:
        catalog.resolve("liverwurst recipe")  # a real word, no typo ("livr" is read as the liver it spells)
    msg = str(err.value)
    assert "'liverwurst recipe'" in msg and "liver" in msg.split("closest known classes:")[1]


@pytest.mark.parametrize("text, listed", [
    ("liver and spleen", "liver, spleen"),
    ("the liver and the gallbladder", "liver, gallbladder"),
    ("kidneys, liver", "kidneys, liver"),
    ("liver/spleen", "liver, spleen"),
    ("aorta or IVC", "aorta, inferior_vena_cava"),
    ("the pancreas & the splenic vein", "pancreas, portal_vein_and_splenic_vein"),
])
def test_a_prompt_listing_classes_is_an_error_not_one_of_them(catalog, text, listed):
    """An embedding of "liver and spleen" reads like the spleen: one class was drawn and the other
    silently dropped. One prompt draws one class."""
    with pytest.raises(PromptError, match=rf"names \d classes \({listed}\); .*give each as its own prompt"):
        catalog.resolve(text)


@pytest.mark.parametrize("text, expected", [
    ("portal vein and splenic vein", "portal_vein_and_splenic_vein"),  # the class's own name
    ("gastric body and fundus", "stomach"),  # "body" next to "gastric" is no list
    ("left and right kidney", "kidneys"),
    ("the gland between the kidneys and the liver", "adrenal_glands"),  # both are landmarks
    ("liver tumour", "liver_tumour"),  # "liver" inside a longer name
])
def test_names_that_are_no_list_still_resolve(catalog, text, expected):
    assert catalog.resolve(text).name == expected


def test_the_keyword_resolver_never_draws_an_organ_for_a_finding(catalog):
    """Without a text encoder the catalog resolves by keywords; a finding prompt is still not its organ."""
    keywords = PromptCatalog(dict(catalog.entries))
    with pytest.raises(PromptError, match=r"a finding \(lesion\), and spleen would draw the whole organ"):
        keywords.resolve("a lesion of the spleen")
    assert keywords.resolve("the spleen next to the lesion").name == "spleen"
    assert keywords.resolve("breast lesion").name == "breast_tumor"


@pytest.mark.parametrize("prompts", [[], [""], ["   "]])
def test_empty_prompt_list_is_an_error(catalog, prompts):
    with pytest.raises(PromptError, match="empty"):
        catalog.resolve_all(prompts)


def test_default_prompts_are_synapse8_and_duplicates_collapse(catalog):
    assert [e.name for _, e in catalog.resolve_all(None)] == list(SYNAPSE8)
    pairs = catalog.resolve_all(["liver", "Liver", "hepar"])
    assert [e.name for _, e in pairs] == ["liver"]


def test_a_single_string_is_not_taken_letter_by_letter(catalog):
    with pytest.raises(PromptError, match="list"):
        catalog.resolve_all("liver")


def test_user_folder_adds_a_class(tmp_path: Path, monkeypatch):
    (tmp_path / "psoas.yaml").write_text(GOOD.format(name="psoas_major"))
    monkeypatch.setenv("MEDPROMPT_PROMPTS_DIRS", str(tmp_path))
    catalog = default_catalog()
    assert catalog.resolve("my alias").name == "psoas_major"
    assert "liver" in catalog


@pytest.mark.parametrize(
    "text, field",
    [
        ("name: Bad Name\ndescriptions: [x]\n", "'name'"),
        ("name: thing\n", "'descriptions'"),
        ("name: thing\ndescriptions: []\n", "'descriptions'"),
        ("name: thing\ndescriptions: [x]\ncolour: red\n", "'colour'"),
        ("name: thing\ndescriptions: [x]\nprior: {supported: true, method: organ, ct: {hu: [100, 0]}}\n", "'prior.ct.hu'"),
        ("name: thing\ndescriptions: [x]\nprior: {supported: true, method: organ, volume_ml: [1]}\n", "'prior.volume_ml'"),
        ("name: thing\ndescriptions: [x]\nprior: {supported: true, methd: organ}\n", "'prior.methd'"),
        ("name: thing\ndescriptions: [x]\nprior: {supported: true}\n", "'prior.method'"),
        ("name: thing\ndescriptions: [x]\nprior: {supported: yes please}\n", "'prior.supported'"),
        ("name: thing\ndescriptions: [x]\nprior: {supported: true, method: organ, ct: {cortex: [1, 2]}}\n",
         "'prior.ct.cortex'"),
        ("name: thing\ndescriptions: [x]\nprior: {supported: true, method: organ, above_pelvis: 1}\n",
         "'prior.above_pelvis'"),
        ("name: thing\ndescriptions: [x\n", "not valid YAML"),
        ("- just\n- strings\n", "expected a mapping"),
    ],
)
def test_malformed_file_names_file_and_field(tmp_path: Path, text: str, field: str):
    path = tmp_path / "thing.yaml"
    path.write_text(text)
    with pytest.raises(PromptError) as err:
        parse_prompt_file(path)
    assert str(path) in str(err.value) and field in str(err.value)


def test_duplicate_class_across_folders_is_reported(tmp_path: Path):
    (tmp_path / "liver.yaml").write_text(GOOD.format(name="liver"))
    with pytest.raises(PromptError, match="already defined"):
        PromptCatalog.load([Path(default_catalog()["liver"].source).parent, tmp_path])


def test_missing_folder_is_reported(tmp_path: Path):
    with pytest.raises(PromptError, match="not found"):
        PromptCatalog.load([tmp_path / "nope"])
