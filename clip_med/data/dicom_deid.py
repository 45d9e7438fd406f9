"""De-identification of what clip_med copies out of a DICOM file: text, ids, keys.

Built on pydicom plus one rule, no extra library: clip_med copies only a dozen tags (see
:data:`COPIED_TAGS`), so what matters is what happens to each of those, decided from DICOM PS3.15
Annex E, Table E.1-1 (the Basic Application Level Confidentiality Profile and its options):

* **kept**: Modality, Body Part Examined, View Position, (Image) Laterality, Photometric
  Interpretation, Rows/Columns, Number of Frames, Transfer Syntax: not in the table (code
  strings and image attributes, which the profile keeps);
* **left out by default**: Study Description, Series Description, Protocol Name (basic profile
  X, removed; the *Clean Descriptors Option* keeps them cleaned) and Patient's Sex / Age (basic
  profile Z / X; the *Retain Patient Characteristics Option* keeps them). ``source.keep_descriptions``
  and ``source.keep_patient_characteristics`` are those two options. Labels read from the
  descriptions by the caption rules are taxonomy ids (a closed vocabulary), so they are kept;
* **pseudonymised**: Patient ID and Study Instance UID (basic profile Z and U) become keyed
  hashes (``meta.case_id``, ``meta.study``), the grouping keys that keep a patient on one side of
  a split; Patient's Name and every other identifying tag are never copied.

**Cleaning** (:func:`scrub`, used for kept descriptions): the file's own identifying values are
collected (:func:`identifying_values`): every element of Table E.1-1 with a text, name, date,
time or UID value that the basic profile removes or replaces (:data:`IDENTIFYING_TAGS`, 249
tags: names, ids, accession and study numbers, institution, physicians, operators, addresses,
dates, times, UIDs, ...), and *any* Person Name (PN) or date (DA/DT) element, in sequences too.
Each value found in the text, case-insensitively, becomes ``[removed]``: a person name by each of
its components (``DOE^JANE`` -> ``DOE``, ``JANE``, as whole words, so "Jane Doe" and "DOE, JANE"
go too), other values as substrings, dates also in their usual written forms (2024-01-31,
31.01.2024, 01/31/2024, ...). Then any other date-like text and any run of five or more digits
(other people's record or accession numbers) is removed as well.

**Keyed hashes** (HMAC-SHA256, :func:`keyed_hash`) for ids, keys and origins derived from file paths
and for the pseudonyms above. A plain hash of a medical record number is no protection (there are
few enough numbers to try them all), so the key must stay out of the shards. It is read from
``source.id_secret_file``, else ``$CLIP_MED_ID_SECRET_FILE``, else ``~/.config/clip_med/id_secret``
(``$XDG_CONFIG_HOME`` honoured), which is created on first use with 32 random bytes (mode 0600).
A per-user file rather than a per-output one or a config value: it is never inside the output
folder and never in a config that a run records, and it is the same on every rerun on that
machine, so the same source gives the same ids, the writer's fingerprint matches, and its no-op
rerun and resume work. Copy the file (or point ``id_secret_file`` at a shared one) to get the same
ids on another machine; a new key gives new ids (and a full rewrite). The manifest records a key id
(an HMAC of a constant), never the key.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import os
import re
from pathlib import Path
from typing import Any

from pydicom.multival import MultiValue

PLACEHOLDER = "[removed]"
ID_SECRET_ENV = "CLIP_MED_ID_SECRET_FILE"
PROFILE = "DICOM PS3.15 Annex E, Basic Application Level Confidentiality Profile"

# Table E.1-1 attributes whose basic-profile action is not K (keep) with a text, name, date, time or UID
# value, less those the Clean Descriptors Option cleans (descriptions are what is scrubbed, not scrub words).
IDENTIFYING_TAGS = frozenset({
    0x00001000, 0x00001001, 0x00020003, 0x00041511, 0x00080014, 0x00080015, 0x00080018, 0x00080020, 0x00080021,
    0x00080022, 0x00080023, 0x00080024, 0x00080025, 0x0008002A, 0x00080030, 0x00080031, 0x00080032, 0x00080033,
    0x00080034, 0x00080035, 0x00080050, 0x00080058, 0x00080080, 0x00080081, 0x00080090, 0x00080092, 0x00080094,
    0x0008009C, 0x00080201, 0x00081010, 0x00081040, 0x00081048, 0x00081050, 0x00081060, 0x00081070, 0x00081155,
    0x00081195, 0x00083010, 0x00100010, 0x00100020, 0x00100021, 0x00100030, 0x00100032, 0x00101000, 0x00101001,
    0x00101005, 0x00101010, 0x00101040, 0x00101050, 0x00101060, 0x00101080, 0x00101081, 0x00101090, 0x00102150,
    0x00102152, 0x00102154, 0x00102155, 0x00102160, 0x001021D0, 0x001021F0, 0x00102297, 0x00102299, 0x00120010,
    0x00120020, 0x00120021, 0x00120030, 0x00120031, 0x00120040, 0x00120042, 0x00120050, 0x00120060, 0x00120071,
    0x00120081, 0x00120082, 0x0016004D, 0x0016004F, 0x00160050, 0x00160051, 0x00160077, 0x00160078, 0x00160082,
    0x0016008D, 0x00181000, 0x00181002, 0x00181004, 0x00181005, 0x00181007, 0x00181008, 0x00181009, 0x0018100B,
    0x00182042, 0x0018700A, 0x00189367, 0x00189369, 0x0018936A, 0x00189371, 0x00189373, 0x00189516, 0x00189517,
    0x0020000D, 0x0020000E, 0x00200010, 0x00200052, 0x00200200, 0x00203406, 0x00209161, 0x00209164, 0x00281199,
    0x00281214, 0x00284000, 0x00320012, 0x00321020, 0x00321021, 0x00321032, 0x00321033, 0x00380010, 0x00380011,
    0x0038001E, 0x00380020, 0x00380021, 0x00380050, 0x00380060, 0x00380061, 0x00380300, 0x00380400, 0x003A0310,
    0x003A0314, 0x00400001, 0x00400002, 0x00400003, 0x00400004, 0x00400005, 0x00400006, 0x00400010, 0x00400011,
    0x00400012, 0x00400241, 0x00400242, 0x00400243, 0x00400244, 0x00400245, 0x00400250, 0x00400251, 0x00400253,
    0x0040050A, 0x00400512, 0x00400551, 0x00400554, 0x004006FA, 0x00401001, 0x00401004, 0x00401005, 0x00401010,
    0x00401102, 0x00401103, 0x00401104, 0x00402008, 0x00402009, 0x00402010, 0x00402011, 0x00402016, 0x00402017,
    0x00403001, 0x00404005, 0x00404008, 0x00404010, 0x00404011, 0x00404023, 0x00404036, 0x00404037, 0x00404050,
    0x00404051, 0x00404052, 0x0040A027, 0x0040A075, 0x0040A123, 0x0040A124, 0x0040A171, 0x0040A172, 0x0040A192,
    0x0040A193, 0x0040A307, 0x0040A352, 0x0040A353, 0x0040A354, 0x0040A402, 0x0040DB0C, 0x0040DB0D, 0x0050001B,
    0x00500020, 0x00620021, 0x00700084, 0x0070031A, 0x00701101, 0x00701102, 0x00880140, 0x00880904, 0x00880906,
    0x00880910, 0x00880912, 0x04000100, 0x20300020, 0x22000005, 0x30060024, 0x300600C2, 0x30080054, 0x30080056,
    0x30080105, 0x30080250, 0x30080251, 0x300A0006, 0x300A0007, 0x300A0013, 0x300A0083, 0x300A00B2, 0x300A0216,
    0x300A0609, 0x300A0611, 0x300A0615, 0x300A0650, 0x300A0700, 0x300A0736, 0x300A073A, 0x300A0741, 0x300A0760,
    0x300E0008, 0x30100006, 0x3010000B, 0x30100013, 0x30100015, 0x3010001B, 0x3010002D, 0x30100031, 0x3010003B,
    0x30100043, 0x3010004C, 0x3010004D, 0x3010006E, 0x3010006F, 0x40000010, 0x40004000, 0x40080042, 0x40080102,
    0x4008010A, 0x4008010C, 0x40080114, 0x40080119, 0x4008011A, 0x40080202,
})
_TEXT_VRS = frozenset({"LO", "SH", "UI", "ST", "LT", "UT", "UC", "AE", "PN", "DA", "DT", "TM", "AS"})
_PIXEL_GROUP = 0x7FE0

# What clip_med copies from a file, and what the basic profile says about it (the manifest's record).
COPIED_TAGS = {
    "Modality (0008,0060)": "not in Table E.1-1: kept (label, text)",
    "BodyPartExamined (0018,0015)": "not in Table E.1-1: kept (label, text)",
    "ViewPosition (0018,5101)": "not in Table E.1-1: kept (text)",
    "ImageLaterality (0020,0062) / Laterality (0020,0060)": "not in Table E.1-1: kept (text)",
    "PhotometricInterpretation, Rows, Columns, NumberOfFrames, TransferSyntaxUID": "image attributes: kept",
}
DESCRIPTION_TAGS = ("StudyDescription (0008,1030)", "SeriesDescription (0008,103E)", "ProtocolName (0018,1030)")
CHARACTERISTIC_TAGS = ("PatientSex (0010,0040)", "PatientAge (0010,1010)")


def default_secret_file() -> Path:
    if os.environ.get(ID_SECRET_ENV):
        return Path(os.environ[ID_SECRET_ENV]).expanduser()
    config = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(config) / "clip_med" / "id_secret"


@functools.lru_cache(maxsize=8)
def _load_key(path: str) -> bytes:
    file = Path(path)
    if not file.exists():
        file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            descriptor = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # made by another process meanwhile
            pass
        else:
            with os.fdopen(descriptor, "w") as handle:
                handle.write(os.urandom(32).hex() + "\n")
    key = file.read_text(encoding="utf-8").strip()
    if len(key) < 16:
        raise ValueError(f"the id secret file {file} holds fewer than 16 characters: put a long random string "
                         "in it (or delete it to have one made)")
    return key.encode("utf-8")


def load_id_key(secret_file: str | None = None) -> bytes:
    """The HMAC key for ids and pseudonyms (see the module docstring for where it comes from)."""
    return _load_key(str(Path(secret_file).expanduser() if secret_file else default_secret_file()))


def keyed_hash(key: bytes, kind: str, value: str, length: int = 16) -> str:
    """``length`` hex digits of HMAC-SHA256(key, kind + value); ``kind`` keeps paths and patient ids apart."""
    return hmac.new(key, f"{kind}\x00{value}".encode("utf-8", "surrogateescape"), hashlib.sha256).hexdigest()[:length]


def key_id(key: bytes) -> str:
    return keyed_hash(key, "clip_med key id", "", 8)


# ---------------------------------------------------------------------------------------------
# Cleaning text


def _values(element) -> list[str]:
    value = element.value
    if value is None:
        return []
    if not isinstance(value, list | tuple | MultiValue):  # a PersonName iterates over its characters
        value = [value]
    return [str(part).strip() for part in value if str(part).strip()]


def _date_forms(date: str) -> list[str]:
    digits = re.sub(r"\D", "", date)[:8]
    if len(digits) != 8:
        return []
    year, month, day = digits[:4], digits[4:6], digits[6:]
    forms = [digits]
    for sep in ("-", "/", ".", " "):
        forms += [f"{year}{sep}{month}{sep}{day}", f"{day}{sep}{month}{sep}{year}", f"{month}{sep}{day}{sep}{year}"]
    return forms


def identifying_values(ds) -> tuple[list[str], list[str]]:
    """``(words, strings)`` of the data set (and its sequences): person-name components, matched as
    whole words, and the other identifying values, matched anywhere. Pixel data is never read."""
    words: set[str] = set()
    strings: set[str] = set()

    def walk(dataset) -> None:
        for tag in list(dataset.keys()):
            if tag.group >= _PIXEL_GROUP or tag.is_private:
                continue
            element = dataset[tag]
            if element.VR == "SQ":
                for item in element.value or []:
                    walk(item)
                continue
            if element.VR not in _TEXT_VRS or not (tag in IDENTIFYING_TAGS or element.VR in ("PN", "DA", "DT")):
                continue
            for value in _values(element):
                if element.VR == "PN":
                    words.update(part for part in re.split(r"[\^=,\s]+", value) if len(part) >= 2)
                    strings.add(value)
                elif element.VR in ("DA", "DT"):
                    strings.update(_date_forms(value))
                    strings.add(value)
                elif element.VR == "TM":
                    strings.add(value.split(".")[0])
                elif len(value) >= 3:
                    strings.add(value)

    walk(ds)
    return sorted(words, key=len, reverse=True), sorted((s for s in strings if len(s) >= 3), key=len, reverse=True)


_DATE_LIKE = re.compile(r"(?<!\d)(?:\d{4}[-/.]\d{1,2}[-/.]\d{1,2}|\d{1,2}[-/.]\d{1,2}[-/.]\d{2,4})(?!\d)")
_LONG_NUMBER = re.compile(r"\d{5,}")


def scrub(text: str, words: list[str], strings: list[str]) -> str:
    """``text`` with the identifying values (of :func:`identifying_values`) and date-like text and long
    numbers replaced by :data:`PLACEHOLDER`, case-insensitively."""
    if not text:
        return text
    patterns = [re.escape(value) for value in strings]
    patterns += [rf"(?<![^\W_]){re.escape(word)}(?![^\W_])" for word in words]
    if patterns:
        text = re.sub("|".join(patterns), PLACEHOLDER, text, flags=re.IGNORECASE)
    text = _LONG_NUMBER.sub(PLACEHOLDER, _DATE_LIKE.sub(PLACEHOLDER, text))
    return " ".join(text.split())


def summary(keep_descriptions: bool, keep_patient_characteristics: bool, hash_paths: bool,
            key: bytes) -> dict[str, Any]:
    """What a DICOM source kept, dropped, cleaned and hashed: the manifest's ``deidentification``."""
    kept: dict[str, str] = dict(COPIED_TAGS)
    dropped: dict[str, str] = {}
    for tag in DESCRIPTION_TAGS:
        if keep_descriptions:
            kept[tag] = "basic profile X; kept cleaned (Clean Descriptors Option, source.keep_descriptions)"
        else:
            dropped[tag] = "basic profile X: left out of txt and json (labels read from it are taxonomy ids)"
    for tag in CHARACTERISTIC_TAGS:
        if keep_patient_characteristics:
            kept[tag] = "kept (Retain Patient Characteristics Option, source.keep_patient_characteristics)"
        else:
            dropped[tag] = "basic profile Z/X: left out"
    dropped["PatientName (0010,0010) and every other Table E.1-1 attribute"] = "never copied"
    pseudonymised = {
        "PatientID (0010,0020)": "HMAC-SHA256 -> meta.case_id",
        "StudyInstanceUID (0020,000D)": "HMAC-SHA256 -> meta.study",
        "file path and folder names": ("HMAC-SHA256 -> id, __key__, origin and the manifest's skipped items"
                                       if hash_paths else "kept as they are (source.hash_paths=false)"),
    }
    return {"profile": PROFILE, "keep_descriptions": keep_descriptions,
            "keep_patient_characteristics": keep_patient_characteristics, "hash_paths": hash_paths,
            "kept": kept, "dropped": dropped, "pseudonymised": pseudonymised,
            "cleaning": ("identifying values of the file, date-like text and runs of 5+ digits -> "
                         f"{PLACEHOLDER!r}") if keep_descriptions else "",
            "hash": "HMAC-SHA256", "key_id": key_id(key)}
