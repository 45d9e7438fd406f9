"""The caption rules: modality and anatomy from radiology vocabulary, unknown rather than a guess."""

import pytest

from clip_med.labels.caption_rules import anatomy_from_text, labels_for_texts, labels_from_text, modality_from_text


@pytest.mark.parametrize("caption,expected", [
    ("Axial computed tomography scan of the pelvis showing a bladder mass.", "ct"),
    ("Contrast-enhanced CT of the chest.", "ct"),
    ("CT angiography showing an aneurysm of the basilar artery.", "ct"),
    ("CTA of the neck.", "ct"),
    ("Sagittal T2-weighted image of the lumbar spine.", "mr"),
    ("Axial FLAIR shows periventricular hyperintensities.", "mr"),
    ("DWI shows restricted diffusion.", "mr"),
    ("MR angiography of the circle of Willis.", "mr"),
    ("MRCP shows a dilated common bile duct.", "mr"),
    ("Postoperative anteroposterior radiograph of the pelvis.", "xray"),
    ("Chest X-ray on admission.", "xray"),
    ("Transvaginal ultrasound shows an ovarian cyst.", "ultrasound"),
    ("Color Doppler sonography of the carotid artery.", "ultrasound"),
    ("Hypoechoic nodule in the right thyroid lobe.", "ultrasound"),
    ("Endoscopic ultrasound of the pancreatic head.", "ultrasound"),
    ("FDG PET/CT shows intense uptake in the mediastinum.", "pet"),
    ("Bone scintigraphy with Tc-99m MDP.", "nuclear_medicine"),
    ("SPECT/CT of the parathyroid glands.", "nuclear_medicine"),
    ("Digital subtraction angiography of the right renal artery.", "angiography"),
    ("Coronary angiography with normal findings.", "angiography"),
    ("Mediolateral oblique mammogram of the left breast.", "mammography"),
    ("Barium swallow showing an indentation of the oesophagus.", "fluoroscopy"),
    ("Hysterosalpingography shows bilateral tubal patency.", "fluoroscopy"),
])
def test_modality_rules(caption, expected):
    assert modality_from_text(caption).label == expected


@pytest.mark.parametrize("caption", [
    "CT and MRI of the brain showing a mass.",  # two modalities: which one is the image?
    "Fundus photograph of the left eye.",  # not a radiology image
    "Optical coherence tomography of the macula.",
    "Fluorescein angiography of the right eye.",  # ophthalmic, not radiological angiography
    "Histological section, H&E staining.",
    "Patient 1 after the operation.",
    "Mr. Smith presented with pain.",  # "Mr" is not MR
    "",
])
def test_modality_unknown_rather_than_guessing(caption):
    assert modality_from_text(caption).label == "unknown"


def test_soft_vetoes_only_cancel_weak_evidence():
    assert modality_from_text("Chest radiograph after endoscopic resection.").label == "xray"
    assert modality_from_text("Endoscopic retrograde cholangiography showing stones.").label == "unknown"


@pytest.mark.parametrize("caption,expected", [
    ("CT scan of the chest showing a large right pulmonary mass.", "thorax"),
    ("Brain MRI showing an infarct.", "head"),
    ("MRI of the lumbar spine with a disc herniation at L4-L5.", "spine_msk"),
    ("Radiograph of the left knee.", "spine_msk"),
    ("Ultrasound of the thyroid gland.", "neck"),
    ("CT of the abdomen showing a liver lesion.", "abdomen"),
    ("Transvaginal ultrasound of the uterus.", "urogenital"),
    ("Postoperative anteroposterior radiograph of the pelvis.", "urogenital"),  # the taxonomy's pelvis
    ("CT scan whole abdomen showing a mass in the right kidney.", "abdomen"),  # the examined region wins
    ("Axial CT through the thoracic spine.", "spine_msk"),  # not thorax
    ("Ultrasound of cervical lymph nodes.", "neck"),  # not spine, not cervix
])
def test_anatomy_rules(caption, expected):
    assert anatomy_from_text(caption).label == expected


@pytest.mark.parametrize("caption", [
    "CT of the abdomen and pelvis.",  # two regions examined
    "Chest CT and brain MRI.",
    "Follow-up CT at 12 months shows no recurrence.",  # no region
    "Radiograph showing the pelvis and a hip prosthesis.",  # pelvis (urogenital) vs hip (msk)
])
def test_anatomy_unknown_rather_than_guessing(caption):
    assert anatomy_from_text(caption).label == "unknown"


def test_evidence_is_reported():
    result = modality_from_text("Chest CT showing nodules.")
    assert result.label == "ct" and ("ct", "CT") in result.evidence


def test_bulk_labels_in_worker_processes_equal_the_serial_ones():
    captions = ["Chest CT.", "Brain MRI.", "Knee radiograph.", "Nothing here.", "Renal ultrasound."] * 3
    serial = [labels_from_text(caption) for caption in captions]
    assert labels_for_texts(captions, workers=2, parallel_from=1, progress=False) == serial
    assert serial[0] == {"modality": "ct", "anatomy": "thorax"}
    assert serial[3] == {"modality": "unknown", "anatomy": "unknown"}
