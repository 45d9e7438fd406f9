"""Med-MAT multiple choice (clip_med.eval.med_mat): fixtures in the README's exact JSON format and layout,
answered by a fake model with orthogonal embeddings (so every answer is known), and the command end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import write_png

from clip_med.core.templates import TemplateError
from clip_med.data.images import ImageRejected
from clip_med.eval.med_mat import (
    MalformedRecord,
    MedMatFile,
    MedMatOptions,
    answer_questions,
    evaluate_med_mat,
    find_files,
    parse_choices,
    parse_record,
    read_file,
    read_med_mat,
    render_markdown,
)

REPO = Path(__file__).resolve().parents[1]
KIDNEY = "med-mat/CT_Kindney_Dataset/" + "/".join(["CT-KIDNEY-DATASET-Normal-Cyst-Tumor-Stone"] * 2)
INSTRUCTION = "Answer with the option's letter from the given choices directly."
LABELS = ["Stone", "Cyst", "Normal", "Tumor", "Benign", "Malignant", "Nevus", "Melanoma", "Glioma", "Meningioma",
          "Pituitary"]


def record(number: int, question: str, options: list[str], answer: int, image: str, data_no: str) -> dict:
    """One record exactly as Med-MAT's README shows it."""
    letters = "ABCD"
    choice = "\n".join([question, *(f"{letters[i]}: {text}" for i, text in enumerate(options)), INSTRUCTION])
    return {"id": number, "caption": options[answer], "image": image, "Question": question,
            "Answer": options[answer], "Question-choice": choice, "Answer-choice": letters[answer],
            "data-no": data_no}


# (file, [(options, answer, the label the image shows (None: no image file), image path)], malformed records)
KIDNEY_Q = "Review this kidney CT scan and determine the possible condition it represents."
SKIN_Q = "Is the skin lesion in this dermoscopy image benign or malignant?"
BRAIN_Q = "Which kind of tumour does this brain MRI show?"
QUESTIONS = {
    "Aggregated_Subsets/Subset--02-train.json": (KIDNEY_Q, "2", [
        (["Stone", "Cyst", "Normal", "Tumor"], 1, "Cyst", f"{KIDNEY}/Cyst/Cyst- (561).jpg"),  # right
        (["Stone", "Normal", "Tumor", "Cyst"], 0, "Stone", f"{KIDNEY}/Stone/Stone- (1).jpg"),  # right
        (["Cyst", "Tumor", "Normal", "Stone"], 2, "Tumor", f"{KIDNEY}/Normal/Normal- (7).jpg"),  # wrong: B
        (["Normal", "Stone", "Cyst", "Tumor"], 3, "Tumor", f"{KIDNEY}/Tumor/Tumor- (3).jpg"),  # right
        (["Tumor", "Normal", "Cyst", "Stone"], 0, None, f"{KIDNEY}/Tumor/Tumor- (9).jpg"),  # image not downloaded
    ]),
    "Aggregated_Subsets/Subset--07-train.json": (SKIN_Q, "9", [
        (["Malignant", "Benign"], 0, "Benign", "med-mat/MED-NODE/naevus/n1.jpg"),  # wrong: B
        (["Benign", "Malignant"], 1, "Malignant", "med-mat/MED-NODE/melanoma/m1.jpg"),  # right
        (["Nevus", "Melanoma", "Benign", "Malignant"], 1, "Melanoma", "med-mat/MED-NODE/melanoma/m2.jpg"),  # right
    ]),
    "Original_Medical_Datasets/Ori--45-train.json": (BRAIN_Q, "45", [
        (["Glioma", "Meningioma", "Pituitary"], 0, "Glioma", "med-mat/Tumor_Classification/glioma/g1.jpg"),  # right
        (["Pituitary", "Glioma", "Meningioma"], 2, "Meningioma", "med-mat/Tumor_Classification/men/m1.jpg"),  # right
        (["Meningioma", "Pituitary", "Glioma"], 1, "Glioma", "med-mat/Tumor_Classification/pit/p1.jpg"),  # wrong: C
    ]),
}
MALFORMED = [  # appended to Subset--02 after its questions (indices 5, 6, 7)
    {"id": 90, "image": f"{KIDNEY}/Cyst/Cyst- (2).jpg", "Question": KIDNEY_Q, "Answer": "Cyst",
     "Question-choice": KIDNEY_Q + "\n" + INSTRUCTION, "Answer-choice": "B", "data-no": "2"},  # no options
    {**record(91, KIDNEY_Q, ["Stone", "Cyst", "Normal", "Tumor"], 1, f"{KIDNEY}/Cyst/Cyst- (3).jpg", "2"),
     "Answer-choice": "E", "Answer": "Nothing"},  # a letter with no option
    "not a record",
]


class FakeModel:
    """Orthogonal embeddings: each label is a basis vector; an option's text maps to its label's (the text
    ends with the label, whatever the template puts before it), an image to the label it is said to show."""

    def __init__(self, shows: dict[str, str], reject: frozenset[str] = frozenset()):
        self.shows, self.reject = shows, reject
        self.texts: list[str] = []
        self.image_calls = 0

    @staticmethod
    def basis(label: str, scale: float = 1.0) -> np.ndarray:
        vector = np.zeros(len(LABELS) + 1, dtype=np.float32)
        vector[LABELS.index(label)] = scale
        return vector

    def embed_images(self, images):
        self.image_calls += 1
        for image in images:
            assert Path(image).is_file(), image
            if image in self.reject:
                raise ImageRejected("truncated_or_corrupt", f"{image}: cut short")
        return np.stack([self.basis(self.shows[image], scale=3.0) for image in images])  # unnormalised on purpose

    def embed_texts(self, texts):
        self.texts += list(texts)
        return np.stack([self.basis(next(label for label in LABELS if text == label or text.endswith(" " + label)))
                         for text in texts])


def make_med_mat(root: Path) -> dict[str, str]:
    """The fixture folder; returns image path -> the label its (fake) embedding shows."""
    shows = {}
    seed = 0
    for name, (question, data_no, items) in QUESTIONS.items():
        records = []
        for number, (options, answer, label, image) in enumerate(items, start=1):
            records.append(record(number, question, options, answer, image, data_no))
            if label is not None:
                seed += 1
                path = root / image
                path.parent.mkdir(parents=True, exist_ok=True)
                write_png(path, seed=seed)  # PNG bytes under a .jpg name, as decoders sniff the content
                shows[str(path)] = label
        if name.endswith("Subset--02-train.json"):
            records += MALFORMED
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(json.dumps(records, indent=4, ensure_ascii=False), encoding="utf-8")
    return shows


ALL_FILES = ["Aggregated_Subsets/Subset--*.json", "Original_Medical_Datasets/Ori--*.json"]


@pytest.fixture
def med_mat(tmp_path):
    root = tmp_path / "Med-MAT"
    return root, make_med_mat(root)


def test_orthogonal_model_gives_the_hand_computed_accuracy(med_mat, tmp_path):
    root, shows = med_mat
    model = FakeModel(shows)
    report = evaluate_med_mat(model, root, ALL_FILES, MedMatOptions(batch_size=2, progress=False),
                              out_dir=tmp_path / "out")
    subsets = report["by_subset"]
    assert list(subsets) == ["Subset--02-train", "Subset--07-train", "Ori--45-train"]
    kidney, skin, brain = subsets.values()
    assert (kidney["answered"], kidney["correct"], kidney["accuracy"]) == (4, 3, 0.75)
    assert (skin["answered"], skin["correct"]) == (3, 2) and skin["accuracy"] == pytest.approx(2 / 3)
    assert (brain["answered"], brain["correct"]) == (3, 2) and brain["accuracy"] == pytest.approx(2 / 3)
    overall = report["overall"]
    assert (overall["questions"], overall["answered"], overall["correct"]) == (11, 10, 7)
    assert overall["accuracy"] == pytest.approx(0.7)
    # chance: 4 four-option (0.25), 2 two-option (0.5), 1 four-option, 3 three-option (1/3), over answered ones
    assert overall["chance"] == pytest.approx((4 * 0.25 + 2 * 0.5 + 0.25 + 3 / 3) / 10)
    assert kidney["chance"] == pytest.approx(0.25) and brain["chance"] == pytest.approx(1 / 3)
    assert skin["chance"] == pytest.approx((0.5 + 0.5 + 0.25) / 3)
    assert overall["above_chance"] == pytest.approx(0.7 - 0.325) and overall["ties"] == 0
    # modality / area / task as the README's tables give them, per file kind
    assert (kidney["kind"], kidney["number"], kidney["split"]) == ("subset", 2, "train")
    assert (kidney["modality"], kidney["area"], kidney["task"]) == ("CT", "Kidney", "Kidney Diseases Classification")
    assert (skin["modality"], skin["area"]) == ("Der", "Skin")
    assert (brain["kind"], brain["modality"], brain["area"], brain["dataset"]) == \
        ("original", "MRI", "Brain", "Tumor Classification")
    assert report["by_modality"]["CT"]["accuracy"] == 0.75 and set(report["by_modality"]) == {"CT", "Der", "MRI"}
    assert set(report["by_area"]) == {"Kidney", "Skin", "Brain"}
    assert report["by_task"]["Pituitary or Glioma or Meningioma or Notumor"]["correct"] == 2
    by_options = report["by_options"]
    assert list(by_options) == ["2", "3", "4"]
    assert [by_options[k]["chance_per_question"] for k in by_options] == pytest.approx([1 / 2, 1 / 3, 1 / 4])
    assert [(by_options[k]["answered"], by_options[k]["correct"]) for k in by_options] == [(2, 1), (3, 2), (5, 4)]
    # the files
    written = json.loads((tmp_path / "out" / "med_mat.json").read_text())
    assert written["overall"] == overall
    markdown = (tmp_path / "out" / "med_mat.md").read_text()
    assert "| Subset--02-train | CT | Kidney | Kidney Diseases Classification | 4 | 3 | 0.7500 | 0.2500 |" in markdown
    assert "## Missing images (1)" in markdown and "## Skipped records (3)" in markdown
    rows = (tmp_path / "out" / "med_mat_predictions.csv").read_text().splitlines()
    assert len(rows) == 1 + 11 and rows[0].startswith("file,index,id,status,options,answer,predicted,correct")
    assert rows[3].startswith("Subset--02-train,2,3,answered,") and ",C,B,0,0.250000," in rows[3]


def test_chance_per_question_follows_the_number_of_options(med_mat):
    root, shows = med_mat
    data = read_med_mat(root, ALL_FILES)
    outcomes = answer_questions(FakeModel(shows), data.questions, MedMatOptions(progress=False))
    chances = {(o.question.file.name, o.question.index): (len(o.question.options), o.question.chance)
               for o in outcomes}
    assert chances[("Subset--07-train", 0)] == (2, 0.5)
    assert chances[("Ori--45-train", 0)] == (3, pytest.approx(1 / 3))
    assert chances[("Subset--02-train", 0)] == (4, 0.25)
    assert chances[("Subset--07-train", 2)] == (4, 0.25)
    predicted = {(o.question.file.name, o.question.index): o.predicted for o in outcomes}
    assert predicted[("Subset--02-train", 2)] == 1 and predicted[("Ori--45-train", 2)] == 2  # the wrong answers
    assert predicted[("Subset--02-train", 4)] is None  # no image


def test_missing_images_are_listed_and_malformed_records_skipped(med_mat):
    root, shows = med_mat
    report = evaluate_med_mat(FakeModel(shows), root, ALL_FILES, MedMatOptions(progress=False))
    assert report["missing_images"] == [{"file": "Subset--02-train", "index": 4, "id": "5",
                                         "image": f"{KIDNEY}/Tumor/Tumor- (9).jpg",
                                         "path": str(root / KIDNEY / "Tumor" / "Tumor- (9).jpg")}]
    skipped = report["skipped_records"]
    assert [(item["file"], item["index"], item["id"]) for item in skipped] == \
        [("Subset--02-train", 5, "90"), ("Subset--02-train", 6, "91"), ("Subset--02-train", 7, None)]
    assert "no lettered options" in skipped[0]["reason"]
    assert "'E' is not one of the options A-D" in skipped[1]["reason"]
    assert "not an object" in skipped[2]["reason"]
    kidney = report["by_subset"]["Subset--02-train"]
    assert (kidney["questions"], kidney["missing_images"], kidney["skipped_records"]) == (5, 1, 3)
    assert report["overall"]["skipped_records"] == 3 and report["by_modality"]["CT"]["skipped_records"] == 3


def test_option_texts_are_embedded_once_and_the_question_template(med_mat):
    root, shows = med_mat
    model = FakeModel(shows)
    evaluate_med_mat(model, root, ALL_FILES, MedMatOptions(batch_size=2, text_batch_size=3, progress=False))
    assert sorted(model.texts) == sorted(LABELS)  # eleven distinct options, each embedded once over 5 batches
    assert model.image_calls == 5  # the 10 questions with an image file, 2 at a time
    with_question = FakeModel(shows)
    report = evaluate_med_mat(with_question, root, ALL_FILES,
                              MedMatOptions(template="{question} {option}", progress=False))
    assert report["overall"]["accuracy"] == pytest.approx(0.7) and report["template"] == "{question} {option}"
    assert f"{KIDNEY_Q} Cyst" in with_question.texts and len(with_question.texts) == len(set(with_question.texts))
    with pytest.raises(ValueError, match="must contain"):
        evaluate_med_mat(model, root, ALL_FILES, MedMatOptions(template="{question}", progress=False))
    with pytest.raises(TemplateError):
        evaluate_med_mat(model, root, ALL_FILES, MedMatOptions(template="{option:>99}", progress=False))


def test_an_unreadable_image_is_counted_not_fatal(med_mat):
    root, shows = med_mat
    bad = str(root / "med-mat/Tumor_Classification/pit/p1.jpg")  # the Ori question answered wrongly
    report = evaluate_med_mat(FakeModel(shows, reject=frozenset({bad})), root, ALL_FILES,
                              MedMatOptions(batch_size=4, progress=False))
    brain = report["by_subset"]["Ori--45-train"]
    assert (brain["answered"], brain["correct"], brain["unreadable_images"], brain["accuracy"]) == (2, 2, 1, 1.0)
    assert report["unreadable_images"] == [{"file": "Ori--45-train", "index": 2, "id": "3",
                                            "image": "med-mat/Tumor_Classification/pit/p1.jpg",
                                            "reason": f"truncated_or_corrupt: {bad}: cut short"}]
    assert report["overall"]["answered"] == 9


def test_default_files_are_the_aggregated_subsets(med_mat):
    root, _ = med_mat
    assert [path.name for path in find_files(root)] == ["Subset--02-train.json", "Subset--07-train.json"]
    with pytest.raises(FileNotFoundError, match="no Med-MAT question file matches"):
        find_files(root, "Original_Medical_Datasets/Ori--99-*.json")
    with pytest.raises(ValueError, match="give the Med-MAT folder"):
        find_files()


@pytest.mark.parametrize("text, expected", [
    ("Which?\nA: Stone\nB: Cyst\nAnswer with the option's letter from the given choices directly.",
     ("Which?", ["Stone", "Cyst"])),
    ("Two lines\nof question.\nA. x ray\nB) y\n(C) z\nsomething after",
     ("Two lines of question.", ["x ray", "y", "z"])),
    ("A: first\nC: skipped letter", ("", ["first"])),
    ("No options here.", ("No options here.", [])),
])
def test_parse_choices(text, expected):
    assert parse_choices(text) == expected


def test_parse_record_tolerates_answer_forms_and_refuses_what_it_cannot_read():
    base = record(1, "Q?", ["Stone", "Cyst", "Normal"], 1, "med-mat/a.png", "2")
    assert parse_record(base) == ("med-mat/a.png", "Q?", ["Stone", "Cyst", "Normal"], 1, "Cyst")
    for letter in ("B", "b", "B:", "(B)", "B: Cyst", " B. "):
        assert parse_record({**base, "Answer-choice": letter})[3] == 1, letter
    assert parse_record({**base, "Answer-choice": None})[3] == 1  # from the Answer text
    assert parse_record({**base, "image": ["med-mat\\a.png"], "data-no": 2})[0] == "med-mat/a.png"
    for bad, reason in [({**base, "Answer-choice": None, "Answer": "Tumor"}, "no usable 'Answer-choice'"),
                        ({**base, "image": ""}, "no 'image'"), ({**base, "image": ["a", "b"]}, "not one path"),
                        ({**base, "Question-choice": "Q?\nA: only\nAnswer."}, "one option only"),
                        ({**base, "Question-choice": None}, "no 'Question-choice'"),
                        ({**base, "Question-choice": ["x"]}, "not a string")]:
        with pytest.raises(MalformedRecord, match=reason):
            parse_record(bad)


def test_reader_tolerates_containers_and_roots(tmp_path):
    root = tmp_path / "mm"
    (root / "med-mat" / "set").mkdir(parents=True)
    write_png(root / "med-mat" / "set" / "a.png")
    good = record(1, "Q?", ["Stone", "Cyst"], 0, "med-mat/set/a.png", "2")
    folder = root / "Original_Medical_Datasets"
    folder.mkdir()
    (folder / "Ori--02-test.json").write_text("\n".join(json.dumps(item) for item in [good, good]) + "\n{broken")
    (folder / "Ori--03.json").write_text(json.dumps({"data": [good]}))
    (folder / "mine.json").write_text(json.dumps({**good, "image": "set/a.png", "Answer": "Cyst"}))
    (folder / "escape.json").write_text(json.dumps([{**good, "image": "../outside.png"}]))
    write_png(tmp_path / "outside.png")
    lines = read_file(folder / "Ori--02-test.json")  # root: the folder above Original_Medical_Datasets
    assert len(lines.questions) == 2 and lines.questions[0].image_exists
    assert [item.index for item in lines.skipped] == [2] and "not JSON" in lines.skipped[0].reason
    assert MedMatFile.from_path(folder / "Ori--02-test.json").split == "test"
    wrapped = read_file(folder / "Ori--03.json", root)
    assert len(wrapped.questions) == 1 and wrapped.files[0].modality == "CT" and wrapped.files[0].split is None
    own = read_file(folder / "mine.json", root)  # a path without med-mat/, a file named otherwise
    assert own.questions[0].image_exists and own.files[0].kind == "other" and own.files[0].modality == "unknown"
    assert own.answer_disagrees == [{"file": "mine", "index": 0, "id": "1", "answer": "Cyst", "option": "Stone"}]
    inside_images = read_file(folder / "Ori--02-test.json", root / "med-mat")  # root = the med-mat folder itself
    assert inside_images.questions[0].image_exists
    escaped = read_file(folder / "escape.json", root)
    assert not escaped.questions and "outside" in escaped.skipped[0].reason
    assert read_file(folder / "escape.json", root, allow_outside_root=True).questions[0].image_exists
    assert MedMatFile.from_path("Ori--97-train.json").modality == "US"  # "Ultrasound" in the original table
    assert MedMatFile.from_path("Ori--57-train.json").dataset == "COVIDGR"
    report = evaluate_med_mat(FakeModel({str(root / "med-mat/set/a.png"): "Stone"}), root,
                              "Original_Medical_Datasets/Ori--03.json", MedMatOptions(progress=False))
    assert report["overall"]["accuracy"] == 1.0 and report["by_area"]["Lung"]["answered"] == 1
    assert "## Missing images" not in render_markdown(report)


def test_the_command_runs_end_to_end_with_a_tiny_checkpoint(med_mat, tmp_path):
    from api_helpers import save_checkpoint

    root, shows = med_mat
    corrupt = root / "med-mat/MED-NODE/naevus/n1.jpg"
    corrupt.write_bytes(b"not an image at all")
    checkpoint = save_checkpoint(tmp_path / "run")
    out = tmp_path / "report"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "clip_med.med_mat", f"checkpoint={checkpoint}", f"root={root}",
                           f"files=[{','.join(ALL_FILES)}]", f"hydra.run.dir={out}", "progress=false",
                           "template='{question} {option}'", "device=cpu"],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Med-MAT: 9 answered of 11 questions" in done.stdout and f"report: {out}/med_mat.md" in done.stdout
    report = json.loads((out / "med_mat.json").read_text())
    overall = report["overall"]
    assert (overall["answered"], overall["missing_images"], overall["unreadable_images"],
            overall["skipped_records"]) == (9, 1, 1, 3)
    assert overall["chance"] == pytest.approx((4 * 0.25 + 0.5 + 0.25 + 3 / 3) / 9)
    assert 0 <= overall["accuracy"] <= 1 and report["checkpoint"] == str(checkpoint)
    assert report["unreadable_images"][0]["file"] == "Subset--07-train"
    assert (out / "med_mat.md").is_file() and (out / "med_mat_predictions.csv").is_file()
