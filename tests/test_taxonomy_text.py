import pytest

from clip_med.data.text import decode_caption, render_text
from clip_med.eval.zero_shot import label_prompts
from clip_med.labels import taxonomy


@pytest.mark.parametrize("task,value,expected", [
    ("modality", "CT", "ct"), ("modality", "MR", "mr"), ("modality", " mri ", "mr"), ("modality", "CR", "xray"),
    ("modality", "PT", "pet"), ("modality", "NM", "nuclear_medicine"), ("modality", "US", "ultrasound"),
    ("modality", "Drawing", "unknown"), ("modality", None, "unknown"), ("modality", "", "unknown"),
    ("anatomy", "Head", "head"), ("anatomy", "Spine and Muscles", "spine_msk"),
    ("anatomy", "Reproductive and Urinary System", "urogenital"), ("anatomy", "Thorax", "thorax"),
    ("anatomy", "Abdomen", "abdomen"), ("anatomy", "Elsewhere", "unknown"),
])
def test_normalize(task, value, expected):
    assert taxonomy.normalize(task, value) == expected


def test_every_medpix_category_maps_to_a_distinct_label():
    categories = ["Head", "Thorax", "Abdomen", "Spine and Muscles", "Reproductive and Urinary System"]
    labels = {taxonomy.normalize("anatomy", c) for c in categories}
    assert len(labels) == 5 and "unknown" not in labels


def test_prompts_use_every_name_in_every_template():
    prompts = label_prompts("modality", ["ct", "mr"], templates=["a {} scan."])
    assert prompts["ct"] == ["a CT scan.", "a computed tomography scan.", "a CT scan scan."]
    assert prompts["mr"][0] == "a MRI scan."


def test_prompts_fill_the_other_task_from_context():
    prompts = label_prompts("anatomy", ["head"], templates=["{modality} image of the {}."],
                            context={"modality": ["ct", "mr", "unknown"]}, synonyms=False)
    assert prompts == {"head": ["CT image of the head.", "MRI image of the head."]}
    everything = label_prompts("modality", ["ct"], templates=["{} image of the {anatomy}."], synonyms=False)
    assert len(everything["ct"]) == len(taxonomy.ANATOMY.labels)
    with pytest.raises(KeyError, match="only {} and task names"):
        label_prompts("modality", ["ct"], templates=["{} image, {colour}."])


def test_unknown_task_and_label_errors_name_the_choices():
    with pytest.raises(KeyError, match="modality"):
        taxonomy.get_task("colour")
    with pytest.raises(KeyError, match="ct, mr"):
        taxonomy.MODALITY.label("photo")


def test_render_text_tidies_empty_fields():
    template = "{modality} image of the {anatomy}, {plane}. {detail}. {caption}"
    text = render_text(template, {"modality": "CT", "anatomy": "head", "plane": "", "detail": None,
                                  "caption": "  A  mass\n seen. "})
    assert text == "CT image of the head. A mass seen."


def test_render_text_rejects_unknown_fields():
    with pytest.raises(KeyError, match="unknown field"):
        render_text("{nope}", {"caption": "x"})


def test_decode_caption_refuses_invalid_utf8():
    text, problem = decode_caption(b"ok \xff\xfe bad")
    assert text == "" and problem.startswith("caption_not_utf8")
    assert decode_caption(b"fine  caption") == ("fine caption", None)
