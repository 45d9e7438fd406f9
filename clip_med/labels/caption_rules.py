"""Modality and anatomy labels read from caption text, for sources whose metadata has none.

The rules favour precision: a caption gets a label only when the evidence points one way, and
``unknown`` otherwise. For each task:

1. **Compound phrases first.** Phrases whose parts would point elsewhere are matched and blanked
   before the single words: ``PET/CT`` is PET, ``CT angiography`` and ``MR venography`` are CT
   and MR (not angiography), ``SPECT/CT`` is nuclear medicine; ``thoracic spine`` and
   ``cervical cord`` are spine, ``uterine cervix`` is urogenital, ``cervical lymph nodes`` neck.
2. **Vetoes** (modality only): captions of photographs, microscopy, fundus or optical coherence
   tomography images, or ECG tracings are not radiology images: ``unknown``, whatever else they
   say. Softer hints of a non-radiology image (endoscopy, histology, "specimen", "intraoperative
   view") cancel weak cues only, since radiology captions mention them too ("CT after
   endoscopic resection").
3. **Strong cues, then weak ones.** A label is given when the strong cues name exactly one label;
   when there are none, the weak cues (``radiographic``, ``cholangiogram``, ``hypoattenuating``,
   ``signal intensity``, ...) must name exactly one. Two different labels (``CT and MRI showed
   ...``) give ``unknown``.
4. **Anatomy: the examined region first.** A region word within a few words of an imaging word
   (``chest CT``, ``MRI of the brain``, ``radiograph of the left knee``) is the examined region;
   if exactly one region is examined, that is the label. Otherwise every region word in the
   caption counts, and again exactly one region must be named.

Acronyms (``CT``, ``MRI``, ``US``, ``PET``) are matched case-sensitively; words are not. The
anatomy labels follow :mod:`clip_med.labels.taxonomy`: the pelvis belongs to ``urogenital`` (as in
MedPix), the breast to ``thorax``, bones and joints of the limbs to ``spine_msk``.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass, field

from clip_med.labels.taxonomy import TASKS, UNKNOWN

_I = re.IGNORECASE


def _words(*alternatives: str) -> str:
    return "|".join(alternatives)


_ASCII_LOWER = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)
_UPPER_ESCAPES = re.compile(r"\\[A-Z]")


class _Text:
    """A caption and its ASCII-lowercased copy (same length, so spans agree). Case-insensitive
    rules run as case-sensitive ASCII patterns on the copy: about 3x faster than re.IGNORECASE."""

    def __init__(self, raw: str):
        self.raw, self.lower = raw, raw.translate(_ASCII_LOWER)

    def masked(self, span: tuple[int, int]) -> _Text:
        start, end = span
        return _Text(self.raw[:start] + " " * (end - start) + self.raw[end:])


@dataclass(frozen=True)
class _Rx:
    pattern: re.Pattern
    lower: bool  # matched against the lowercased copy

    def finditer(self, text: _Text):
        return self.pattern.finditer(text.lower if self.lower else text.raw)

    def search(self, text: _Text, start: int = 0, end: int | None = None):
        source = text.lower if self.lower else text.raw
        return self.pattern.search(source, start, len(source) if end is None else end)


def _rx(pattern: str, flags: int = _I) -> _Rx:
    if flags & _I:
        if _UPPER_ESCAPES.search(pattern):
            raise ValueError(f"case-insensitive rule {pattern!r} uses an upper-case escape: it would be lowercased")
        return _Rx(re.compile(pattern.lower(), re.ASCII), lower=True)
    return _Rx(re.compile(pattern), lower=False)


@dataclass(frozen=True)
class Cue:
    label: str
    pattern: _Rx
    strong: bool = True


@dataclass
class TextLabel:
    """A label with the evidence for it (the matched words), for auditing the rules."""

    label: str
    evidence: list[tuple[str, str]] = field(default_factory=list)  # (label, matched text)
    reason: str = ""


# ---------------------------------------------------------------------------------------------
# Modality

_ANGIO = r"(?:angiogra\w*|venogra\w*|arteriogra\w*|angio\b)"
MODALITY_COMPOUNDS: tuple[Cue, ...] = (
    Cue("pet", _rx(r"\b(?:PET|FDG)\s*[-/–]?\s*(?:CT|MRI?)\b", 0)),
    Cue("pet", _rx(r"\bpositron[\s-]emission\s+tomography[\s/–-]+(?:computed\s+tomography|CT)\b")),
    Cue("nuclear_medicine", _rx(r"\bSPECT\s*[-/–]?\s*CT\b", 0)),
    Cue("ct", _rx(rf"\b(?:CT|MDCT|MSCT|computed\s+tomograph\w*|computeri[sz]ed\s+tomograph\w*)\s*[-(]?\s*"
                  rf"{_ANGIO}")),
    Cue("ct", _rx(rf"\b{_ANGIO}\s*[-/]?\s*CT\b|\bCT[AV]\b|\bCT[-\s]?myelogra\w*", 0)),
    Cue("mr", _rx(rf"\b(?:MRI?|magnetic\s+resonance(?:\s+imaging)?)\s*[-(]?\s*{_ANGIO}", 0)),
    Cue("mr", _rx(rf"\bmagnetic\s+resonance(?:\s+imaging)?\s*[-(]?\s*{_ANGIO}|\b{_ANGIO}\s*[-/]?\s*MRI?\b")),
    Cue("mr", _rx(r"\bMR\s*(?:cholangio\w*|urogra\w*|enterogra\w*|arthrogra\w*|elastogra\w*|myelogra\w*)", _I)),
    Cue("ultrasound", _rx(r"\b(?:endoscopic|intravascular|doppler)\s+(?:ultraso\w*|sonogra\w*)")),
    Cue("ultrasound", _rx(r"\b(?:ultrasound|sonographic|doppler)\s+elastogra\w*")),
)

# Captions of images that are not radiology images: unknown whatever else they say.
MODALITY_VETOES: tuple[_Rx, ...] = (
    _rx(r"\boptical\s+coherence|\bfundus\s+(?:photo\w*|image\w*|autofluorescence|examination|angiogra\w*)"),
    _rx(r"\bfluorescein\b|\bindocyanine\b|\bslit[\s-]?lamp|\bdermoscop\w*|\bphotograph\w*|\bmicrograph\w*"),
    _rx(r"\bmicroscop\w*|\bimmunohisto\w*|\bha?ematoxylin|\belectrocardiogra\w*|\belectroencephalogra\w*"),
    _rx(r"\b(?:OCT|OCTA|ICG|ICGA|ECG|EKG|EEG|H&E)\b", 0),
)
# Words that suggest a non-radiology image but also appear in radiology captions ("CT after
# endoscopic resection"): they only cancel weak cues, never a strong one.
MODALITY_SOFT_VETOES: tuple[_Rx, ...] = (
    _rx(r"\bendoscop(?:y|ic)\b(?!\s+(?:ultraso|sonogra))|\b(?:colono|gastro|broncho|laparo|arthro|cysto|hystero)scop\w*"),
    _rx(r"\bintra-?operative\s+(?:view|photo\w*|finding\w*|image)|\bclinical\s+(?:picture|appearance|image)"),
    _rx(r"\bhistolog\w*|\bhistopatholog\w*|\bspecimen\b|\bgross\s+(?:appearance|patholog\w*)|\bstain(?:ed|ing)\b"),
)

MODALITY_CUES: tuple[Cue, ...] = (
    Cue("ct", _rx(r"\b(?:CT|CTs|HRCT|MDCT|MSCT|CECT|NCCT|CBCT|NECT|TDM)\b|\bC\.T\b", 0)),
    Cue("ct", _rx(r"\bcomputed?\s+tomogra\w*|\bcomputeri[sz]ed\s+(?:axial\s+)?tomogra\w*|\bCAT\s+scan")),
    Cue("ct", _rx(r"\bcone[\s-]beam\b|\btomodensitometr\w*|\bhounsfield\b")),
    Cue("ct", _rx(r"\b(?:hypo|hyper|iso|low|high)?[\s-]?attenuat\w*"), strong=False),
    Cue("mr", _rx(r"\b(?:MRI|MRIs|MRA|MRV|MRCP|fMRI|cMRI|NMR|IRM|DWI|FLAIR|ADC|STIR|SWI|TSE|FSE|HASTE|FIESTA|SSFP|"
                  r"FISP|TrueFISP)\b", 0)),
    Cue("mr", _rx(r"\bMR(?=[\s-]+(?:imag|scan|examination|stud|sequence|series|T1|T2|of\b|show|reveal|demonstr|find))",
                  0)),
    Cue("mr", _rx(r"\bmagnetic\s+resonance|\bT[12][\s-]?(?:weighted|WI?\b|w\b)|\bdiffusion[\s-]weighted")),
    Cue("mr", _rx(r"\bapparent\s+diffusion|\bsusceptibility[\s-]weighted|\bproton[\s-]density|\bgadolinium\w*"
                  r"|\bperfusion[\s-]weighted")),
    Cue("mr", _rx(r"\b(?:gradient|spin|turbo\s+spin|fast\s+spin)[\s-]echo\b|\bfat[\s-](?:sat\w*|suppress\w*)")),
    Cue("mr", _rx(r"\b(?:hyper|hypo|iso)[\s-]?intens\w*|\bsignal\s+intensit\w*"), strong=False),
    Cue("xray", _rx(r"\bradiograph(?:s|y)?\b|\bx[\s-]?rays?\b|\broentgeno?gra\w*|\bplain\s+(?:film|radiograph)s?")),
    Cue("xray", _rx(r"\bchest\s+films?\b|\borthopantomo\w*|\bpanoramic\s+(?:radiograph|x-ray|view|image)")),
    Cue("xray", _rx(r"\bcephalo(?:gram|metric)\w*|\bradiovisio\w*|\bbitewing\b|\bperiapical\s+(?:film|image|view)")),
    Cue("xray", _rx(r"\b(?:OPG|CXR|KUB|AXR|IOPA)\b", 0)),
    Cue("xray", _rx(r"\bradiographi(?:e|a)\b")),
    Cue("xray", _rx(r"\bradiographic(?:al)?(?:ly)?\b|\bperiapical\b"), strong=False),
    Cue("ultrasound", _rx(r"\bultrasound\w*|\bultrasonogra\w*|\bsonogra\w*|\bechogra\w*|\bechocardiogra\w*")),
    Cue("ultrasound", _rx(r"\bdoppler\b|\bduplex\b|\b(?:hypo|hyper|an|iso)echo(?:ic|genic\w*)\b|\bechogenic\w*")),
    Cue("ultrasound", _rx(r"\bB[\s-]mode\b|\bM[\s-]mode\b|\bparasternal\w*|\bapical\s+(?:two|three|four|five|[2345])"
                          r"[\s-]chamber")),
    Cue("ultrasound", _rx(r"\b(?:US|USG|TTE|TEE|TOE|EUS|IVUS|CEUS|TVUS|TRUS)\b", 0)),
    Cue("ultrasound", _rx(r"\btransducer\b")),
    Cue("ultrasound", _rx(r"\belastogra\w*|\bmid-?o?esophageal\b|\b(?:two|three|four|five|[2345])[\s-]chamber\s+view"),
        strong=False),
    Cue("pet", _rx(r"\b(?:PET|FDG)\b", 0)),
    Cue("pet", _rx(r"\bpositron[\s-]emission")),
    Cue("pet", _rx(r"\bSUV(?:max)?\b", 0), strong=False),
    Cue("nuclear_medicine", _rx(r"\bscintigra\w*|\bscintiscan\w*|\bbone\s+scan\w*|\bradionuclide\b"
                                r"|\bnuclear\s+medicine")),
    Cue("nuclear_medicine", _rx(r"\btc[\s-]?99m?\b|\b99m[\s-]?tc\b|\btechnetium\b|\bsestamibi\b|\bgamma\s+camera")),
    Cue("nuclear_medicine", _rx(r"\boctreo(?:scan|tide\s+scan)|\bdatscan\b|\brenogra(?:m|phy)\b"
                                r"|\bgallium[\s-]?(?:67|scan)")),
    Cue("nuclear_medicine", _rx(r"\b(?:SPECT|MIBG|MIBI|DMSA|MAG3)\b", 0)),
    Cue("angiography", _rx(r"\bangiogra\w*|\barteriogra\w*|\baortogra\w*|\bphlebogra\w*|\bvenogra\w*|\bportogra\w*")),
    Cue("angiography", _rx(r"\bdigital\s+subtraction|\bventriculogra\w*|\bcavogra\w*")),
    Cue("angiography", _rx(r"\bDSA\b", 0)),
    Cue("mammography", _rx(r"\bmammogra\w*|\btomosynthesis\b|\bcraniocaudal\b|\bmediolateral\s+oblique\b")),
    Cue("mammography", _rx(r"\b(?:MLO|DBT)\b", 0)),
    Cue("fluoroscopy", _rx(r"\bfluoroscop\w*|\bbarium\b|\bo?esophagogra\w*|\bo?esophagram\b|\bgastrografin\b")),
    Cue("fluoroscopy", _rx(r"\bcontrast\s+swallow|\bswallow\s+study|\bupper\s+GI\s+series|\bsmall[\s-]bowel\s+follow")),
    Cue("fluoroscopy", _rx(r"\bhysterosalpingogra\w*|\bcystourethrogra\w*|\burethrogra\w*|\bcystogra\w*")),
    Cue("fluoroscopy", _rx(r"\b(?:HSG|VCUG|MCUG|RUG)\b", 0)),
    Cue("fluoroscopy", _rx(r"\bcholangiogra\w*|\bfistulogra\w*|\bsialogra\w*|\bdefecogra\w*|\bloopogra\w*"),
        strong=False),
    Cue("fluoroscopy", _rx(r"\bERCP\b|\bPTC\b", 0), strong=False),
)


# ---------------------------------------------------------------------------------------------
# Anatomy

ANATOMY_COMPOUNDS: tuple[Cue, ...] = (
    Cue("spine_msk", _rx(r"\b(?:cervical|thoracic|lumbar|sacral|dorsal|lumbosacral|thoracolumbar|cervicothoracic)\s+"
                         r"(?:spine|spinal|vertebr\w*|dis[ck]s?|cord|canal|levels?|segments?|myelopathy)")),
    Cue("spine_msk", _rx(r"\bspinal\s+cord|\bpelvic\s+(?:bone|ring|fracture|girdle)|\bfemoral\s+(?:head|neck|shaft|"
                         r"condyle|fracture|component|stem)|\bradial\s+head|\biliac\s+(?:bone|crest|wing)")),
    Cue("spine_msk", _rx(r"\b(?:pubic\s+(?:symphysis|ramus|rami)|sacroiliac)")),
    Cue("urogenital", _rx(r"\buterine\s+cervix|\bcervical\s+(?:cancer|carcinoma|canal|length|os|stenosis|pregnancy|"
                          r"ectopic)|\brenal\s+pelvis")),
    Cue("neck", _rx(r"\bcervical\s+(?:lymph\w*|nodes?|mass|region|soft\s+tissues?|o?esophag\w*|trachea)")),
    Cue("thorax", _rx(r"\bthoracic\s+(?:aorta|cavity|wall|inlet|outlet)|\bchest\s+wall"
                      r"|\b(?:upper|middle|lower)\s+lobes?")),
    Cue("thorax", _rx(r"\baortic\s+(?:arch|valve|root)|\b(?:ascending|descending)\s+aorta|\b(?:left|right)\s+"
                      r"(?:ventric\w*|atri(?:um|al))")),
    Cue("head", _rx(r"\b(?:frontal|temporal|parietal|occipital)\s+(?:lobes?|bones?|horns?|region)|\btemporal\s+bone"
                    r"|\b(?:cavernous|sagittal|sigmoid|transverse|maxillary|frontal|sphenoid|ethmoid)\s+sinus\w*")),
    Cue("head", _rx(r"\bhead\s+and\s+neck\b|\bcranial\s+(?:MRI|MR|CT|computed|magnetic|imaging|scans?|fossae?|nerves?"
                    r"|vault|base)\b|\b(?:orthopantomo\w*|panoramic\s+(?:radiograph|x-ray|film|view|image)|periapical"
                    r"|bitewing|root\s+canal)")),
    Cue("head", _rx(r"\b(?:OPG|IOPA)\b", 0)),
    Cue("head", _rx(r"\blateral\s+ventricles?|\bfourth\s+ventricle|\bthird\s+ventricle"
                    r"|\boptic\s+(?:nerve|disc|chiasm)")),
    Cue("abdomen", _rx(r"\babdominal\s+(?:aorta|wall|cavity)|\bportal\s+(?:vein|venous)|\bhepatic\s+hilum")),
)

ANATOMY_CUES: tuple[Cue, ...] = (
    Cue("head", _rx(_words(
        r"\bbrains?\b", r"\bc[eé]r[eé]br\w*", r"\b\w*cerebell\w*", r"\bintracranial\b", r"\bcranium\b",
        r"\bskull\b", r"\bcalvari\w*", r"\bhead\b", r"\borbit(?:s|al)?\b", r"\bintraorbital\b", r"\bsellar?\b",
        r"\bsuprasellar\b", r"\bpituitary\b", r"\bhippocamp\w*", r"\bthalam\w*", r"\bbasal\s+ganglia\b",
        r"\bbrain\s*stem\b", r"\bpons\b", r"\bpontine\b", r"\bmidbrain\b", r"\bcorpus\s+callosum\b",
        r"\bwhite\s+matter\b", r"\bmeninge\w*", r"\bsubdural\b", r"\bsubarachnoid\b", r"\bencephal\w*",
        r"\bhydrocephal\w*", r"\bmastoid\w*", r"\bcochle\w*", r"\bparanasal\b", r"\bnasal\b", r"\bfacial\b",
        r"\bface\b(?!-on)", r"\bmandib\w*", r"\bmaxill\w*", r"\bzygom\w*", r"\bteeth\b", r"\btooth\b", r"\bdental\b",
        r"\bmolars?\b", r"\btemporomandibular\b", r"\bocular\b", r"\beyes?\b", r"\bglioma\w*", r"\bglioblastoma\w*",
        r"\bmeningioma\w*", r"\bventriculomegaly\b", r"\bcircle\s+of\s+willis\b", r"\bbasilar\b",
    ))),
    Cue("head", _rx(r"\bTMJ\b", 0)),
    Cue("neck", _rx(_words(
        r"\bnecks?\b", r"\bthyroid\w*", r"\bparathyroid\w*", r"\blaryn\w*", r"\b\w*pharyn\w*", r"\bvocal\s+cords?\b",
        r"\bepiglott\w*", r"\bparotid\b", r"\bsubmandibular\b", r"\bsublingual\b", r"\bsalivary\b", r"\bjugular\b",
        r"\bcarotid\s+(?:bulb|bifurcation|body)\b", r"\bcommon\s+carotid\b", r"\bsupraclavicular\b", r"\btonsil\w*",
        r"\bthyroglossal\b", r"\bbranchial\b",
    ))),
    Cue("thorax", _rx(_words(
        r"\bchest\b", r"\b\w*thora(?:x|cic)\b", r"\blungs?\b", r"\bpulmonar\w*", r"\b\w*pleura\w*",
        r"\b(?:pneumo)?mediastin\w*",
        r"\bbronch\w*", r"\blingula\w*", r"\bpneumonia\b", r"\bpneumothorax\b", r"\bhearts?\b", r"\bcardiac\b",
        r"\bcardiomegaly\b", r"\bcoronar\w*", r"\bmyocard\w*", r"\bpericardi\w*", r"\bmitral\b", r"\btricuspid\b",
        r"\bbreasts?\b", r"\bmammary\b", r"\baxilla\w*", r"\bstern(?:um|al)\b", r"\bthym(?:us|ic|oma)\b",
        r"\bintrathoracic\b", r"\bcardiothoracic\b",
    ))),
    Cue("abdomen", _rx(_words(
        r"\babdom\w*", r"\blivers?\b", r"\bhepat\w*", r"\bgall\s?bladder\b", r"\bbiliar\w*", r"\bbile\s+ducts?\b",
        r"\bcholedoch\w*", r"\bpancrea\w*", r"\bspleen\b", r"\bsplen\w*", r"\bstomach\b", r"\bgastric\b",
        r"\bgastrointestinal\b", r"\bduoden\w*", r"\bjejun\w*", r"\bile(?:um|al)\b", r"\bbowels?\b", r"\bintestin\w*",
        r"\bcolon\b", r"\bcolonic\b", r"\bcolitis\b", r"\bc(?:a)?ec(?:um|al)\b", r"\bappendi(?:x|citis|ceal|ces)\b",
        r"\brect(?:um|al)\b", r"\bsigmoid\s+colon\b", r"\bperitone\w*", r"\bretroperitone\w*", r"\bmesenter\w*",
        r"\bomen(?:tum|tal)\b", r"\badrenal\w*", r"\bceliac\b", r"\bascites\b", r"\bcholangiocarcinoma\b",
    ))),
    Cue("urogenital", _rx(_words(
        r"\bkidneys?\b", r"\brenal\b", r"\bnephr\w*", r"\bpyel\w*", r"\bureter\w*", r"\bbladder\b",
        r"\bvesicoureter\w*",
        r"\burethr\w*", r"\bprostat\w*", r"\buter(?:us|ine)\b", r"\bendometri\w*", r"\bmyometri\w*",
        r"\bovar(?:y|ies|ian)\b", r"\badnex\w*", r"\bfallopian\b", r"\bsalping\w*", r"\bcervix\b", r"\bvagin\w*",
        r"\bvulv\w*", r"\bplacent\w*", r"\bgestational\b", r"\btestis\b", r"\btestes\b", r"\btesticle\w*",
        r"\btesticular\b", r"\bscrot\w*", r"\bepididym\w*", r"\bpenis\b", r"\bpenile\b", r"\bseminal\s+vesicles?\b",
        r"\bpelvis\b", r"\bpelvic\b", r"\bhysterosalpingo\w*", r"\burinary\b",
    ))),
    Cue("spine_msk", _rx(_words(
        r"\bspine\b", r"\bspinal\b", r"\bvertebr\w*", r"\bintervertebral\b", r"\blumbar\b", r"\blumbosacral\b",
        r"\bsacr(?:um|al)\b", r"\bcoccy\w*", r"\bknees?\b", r"\bhips?\b", r"\bfemur\b", r"\btibia\w*", r"\bfibula\w*",
        r"\bpatell\w*", r"\bankles?\b", r"\bfoot\b", r"\bfeet\b", r"\btoes?\b", r"\bcalcane\w*", r"\btal(?:us|ar)\b",
        r"\bmetatars\w*", r"\bshoulders?\b", r"\bhumer\w*", r"\belbows?\b", r"\bulna\b", r"\bwrists?\b", r"\bhands?\b",
        r"\bfingers?\b", r"\bthumbs?\b", r"\bcarp(?:al|us)\b", r"\bmetacarp\w*", r"\bphalan\w*", r"\bscapul\w*",
        r"\bclavic\w*", r"\bsternoclavicular\b", r"\bacromi\w*", r"\bglenoid\b", r"\brotator\s+cuff\b",
        r"\bacetabul\w*", r"\bthighs?\b",
        r"\blegs?\b", r"\bforearms?\b", r"\barms?\b", r"\blimbs?\b", r"\bextremit\w*", r"\btendons?\b",
        r"\bligaments?\b",
        r"\bmenisc\w*", r"\bcartilag\w*", r"\bachilles\b", r"\bcruciate\b", r"\bdis[ck]\s+(?:herniation|protrusion|"
        r"bulge|space|degeneration|extrusion)\b", r"\bherniated\s+dis[ck]\b",
    ))),
    Cue("spine_msk", _rx(r"\b(?:[CL][1-7]|T1[0-2]|S1)\s*[-–/]\s*(?:[CLTS][1-9]\d?)\b"
                         r"|\b(?:L[1-5]|T1[0-2]|C[2-7])\b", 0)),
)

# Words that name the imaging itself: a region word close to one of these is the examined region.
_EXAM_WORDS = _rx(r"\b(?:scans?|images?|imaging|views?|films?|radiographs?|stud(?:y|ies)|examinations?|projections?"
                  r"|sections?|slices?|angiogra\w*|sonogra\w*|ultrasound\w*|tomograph\w*|reconstructions?|MRI|MR|CT|"
                  r"X-rays?|PET|SPECT|scintigra\w*|mammogra\w*|radiography)\b")
_EXAM_WINDOW = 30  # characters between an imaging word and a region word
_CLAUSE_BREAK = _rx(r"[.;:]\s|\b(?:showing|shows|showed|revealed|reveals|demonstrat\w*|with)\b")


def _find(cues: tuple[Cue, ...], text: _Text) -> list[tuple[Cue, re.Match]]:
    return [(cue, match) for cue in cues for match in cue.pattern.finditer(text)]


def _single(labels: set[str]) -> str | None:
    return next(iter(labels)) if len(labels) == 1 else None


def modality_from_text(caption: str) -> TextLabel:
    """The modality a caption names (see the module docstring for the rules)."""
    text = _Text(caption)
    for veto in MODALITY_VETOES:
        match = veto.search(text)
        if match:
            return TextLabel(UNKNOWN, [("veto", match.group(0))], "not a radiology image")
    hits = []
    for cue, match in _find(MODALITY_COMPOUNDS, text):
        hits.append((cue, match))
        text = text.masked(match.span())
    hits += _find(MODALITY_CUES, text)
    evidence = [(cue.label, match.group(0)) for cue, match in hits]
    strong = {cue.label for cue, _ in hits if cue.strong}
    weak = {cue.label for cue, _ in hits if not cue.strong}
    if strong:
        label = _single(strong)
        return TextLabel(label, evidence) if label else TextLabel(UNKNOWN, evidence, "several modalities named")
    soft = next((match for veto in MODALITY_SOFT_VETOES for match in [veto.search(text)] if match), None)
    if soft:
        return TextLabel(UNKNOWN, [*evidence, ("veto", soft.group(0))], "not a radiology image")
    label = _single(weak)
    if label:
        return TextLabel(label, evidence)
    return TextLabel(UNKNOWN, evidence, "several modalities named" if weak else "no modality named")


def _near_exam_word(text: _Text, span: tuple[int, int], exam_spans: list[tuple[int, int]]) -> bool:
    start, end = span
    for exam_start, exam_end in exam_spans:
        gap = (exam_end, start) if exam_end <= start else (end, exam_start)
        if 0 <= gap[1] - gap[0] <= _EXAM_WINDOW and not _CLAUSE_BREAK.search(text, gap[0], gap[1]):
            return True
        if exam_start <= start < exam_end:
            return True
    return False


def anatomy_from_text(caption: str) -> TextLabel:
    """The body region a caption names (see the module docstring for the rules)."""
    text = _Text(caption)
    exam_spans = [match.span() for match in _EXAM_WORDS.finditer(text)]
    exam_spans += [match.span() for _, match in _find(MODALITY_COMPOUNDS + MODALITY_CUES, text)]
    hits = []
    masked = text
    for cue, match in _find(ANATOMY_COMPOUNDS, text):
        hits.append((cue, match))
        masked = masked.masked(match.span())
    hits += _find(ANATOMY_CUES, masked)
    evidence = [(cue.label, match.group(0)) for cue, match in hits]
    examined = {cue.label for cue, match in hits if _near_exam_word(text, match.span(), exam_spans)}
    if examined:
        label = _single(examined)
        return TextLabel(label, evidence) if label else TextLabel(UNKNOWN, evidence, "several regions examined")
    label = _single({cue.label for cue, _ in hits})
    if label:
        return TextLabel(label, evidence)
    return TextLabel(UNKNOWN, evidence, "several regions named" if hits else "no region named")


TEXT_RULES = {"modality": modality_from_text, "anatomy": anatomy_from_text}


def labels_from_text(text: str, tasks: tuple[str, ...] = tuple(TASKS)) -> dict[str, str]:
    return {task: TEXT_RULES[task](text or "").label for task in tasks}


def _labels_chunk(texts: list[str]) -> list[dict[str, str]]:
    return [labels_from_text(text) for text in texts]


def labels_for_texts(texts: list[str], workers: int | None = None, progress: bool = True,
                     parallel_from: int = 20_000) -> list[dict[str, str]]:
    """:func:`labels_from_text` for many captions (about 1 ms each), over worker processes when
    there are at least ``parallel_from`` of them (PMC-OA's 1.6M captions take minutes, not half an hour)."""
    import os

    from tqdm.auto import tqdm

    from clip_med.core.processes import spawn_pool

    workers = (os.cpu_count() or 1) if workers is None else workers
    if len(texts) < parallel_from or workers <= 1:
        return _labels_chunk(texts)
    chunk = 2000
    chunks = [texts[start:start + chunk] for start in range(0, len(texts), chunk)]
    results: list[dict[str, str]] = []
    with spawn_pool(workers) as pool, \
            tqdm(total=len(texts), desc="caption labels", unit="caption", disable=not progress) as bar:
        for labels in pool.imap(_labels_chunk, chunks):
            results.extend(labels)
            bar.update(len(labels))
    return results
