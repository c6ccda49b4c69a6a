"""Catalogs: file names and folders -> label, speaker, gender; bad names are skipped with a reason.

Catalogs read names only, so the fake trees hold a few bytes per file, not real audio.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from kndcli.config import LABELS
from kndcli.datasets import catalog, normalize_label
from kndcli.errors import KndError


def touch(root: Path, *names: str) -> None:
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"RIFF")


# ----------------------------------------------------------------------------- ravdess


def test_ravdess_labels_speakers_genders_and_extra(tmp_path: Path) -> None:
    touch(
        tmp_path,
        "Actor_01/03-01-05-02-01-02-01.wav",
        "Actor_02/03-01-08-01-02-01-02.flac",
        "Actor_02/03-01-01-01-01-01-02.WAV",
        "Actor_02/README.md",
    )
    result = catalog("ravdess", tmp_path)
    assert result.skipped == []
    got = [(c.path.name, c.label, c.speaker, c.gender, c.dataset) for c in result.clips]
    assert got == [
        ("03-01-05-02-01-02-01.wav", "angry", "01", "male", "ravdess"),
        ("03-01-01-01-01-01-02.WAV", "neutral", "02", "female", "ravdess"),
        ("03-01-08-01-02-01-02.flac", "surprised", "02", "female", "ravdess"),
    ]
    assert result.clips[0].extra == {
        "modality": "03",
        "vocal_channel": "speech",
        "intensity": "strong",
        "statement": "01",
        "repetition": "02",
    }


def test_ravdess_every_emotion_code(tmp_path: Path) -> None:
    touch(tmp_path, *(f"03-01-{code:02d}-01-01-01-03.wav" for code in range(1, 9)))
    labels = [c.label for c in catalog("ravdess", tmp_path).clips]
    assert labels == ["neutral", "calm", "happy", "sad", "angry", "fearful", "disgust", "surprised"]


def test_ravdess_song_only_with_include_song(tmp_path: Path) -> None:
    touch(tmp_path, "03-01-03-01-01-01-05.wav", "03-02-03-01-01-01-05.wav")
    speech = catalog("ravdess", tmp_path)
    assert [c.extra["vocal_channel"] for c in speech.clips] == ["speech"]
    assert speech.skipped == []  # leaving song out is a choice, not a problem to report
    both = catalog("ravdess", tmp_path, include_song=True)
    assert sorted(c.extra["vocal_channel"] for c in both.clips) == ["song", "speech"]


def test_ravdess_song_only_folder_says_how_to_include_it(tmp_path: Path) -> None:
    touch(tmp_path, "03-02-03-01-01-01-05.wav")
    with pytest.raises(KndError, match="include_song"):
        catalog("ravdess", tmp_path)


def test_ravdess_bad_names_are_skipped_with_reasons(tmp_path: Path) -> None:
    touch(
        tmp_path,
        "03-01-05-01-01-01-01.wav",
        "03-01-09-01-01-01-01.wav",  # emotion 09 does not exist
        "notes.wav",
        "03-01-05-01-01-01.wav",  # six fields
        "03-01-05-01-01-01-00.wav",  # actor 00
        "._03-01-05-01-01-01-01.wav",  # macOS resource fork: ignored silently
        "02-01-05-01-01-01-01.mp4",  # video: not an audio extension
    )
    result = catalog("ravdess", tmp_path)
    assert [c.path.name for c in result.clips] == ["03-01-05-01-01-01-01.wav"]
    reasons = {Path(line.split(": ")[0]).name: line for line in result.skipped}
    assert set(reasons) == {
        "03-01-09-01-01-01-01.wav",
        "notes.wav",
        "03-01-05-01-01-01.wav",
        "03-01-05-01-01-01-00.wav",
    }
    assert "unknown RAVDESS emotion code 09" in reasons["03-01-09-01-01-01-01.wav"]
    assert "not a RAVDESS name" in reasons["notes.wav"]


def test_synth_uses_ravdess_names(tmp_path: Path) -> None:
    touch(tmp_path, "Actor_03/03-01-04-01-01-01-03.wav")
    (clip,) = catalog("synth", tmp_path).clips
    assert (clip.label, clip.speaker, clip.gender, clip.dataset) == ("sad", "03", "male", "synth")


def test_catalog_is_sorted_and_deterministic(tmp_path: Path) -> None:
    names = [f"Actor_{a:02d}/03-01-0{e}-01-01-01-{a:02d}.wav" for a in (9, 2, 5) for e in (3, 1)]
    touch(tmp_path, *names)
    first = catalog("ravdess", tmp_path).clips
    assert [str(c.path) for c in first] == sorted(str(c.path) for c in first)
    assert catalog("ravdess", tmp_path).clips == first
    assert len({*first}) == len(first)  # clips are hashable despite the extra dict


# ----------------------------------------------------------------------------- cremad


CREMAD_NAMES = [
    "AudioWAV/1001_DFA_ANG_XX.wav",
    "AudioWAV/1001_IEO_HAP_HI.wav",
    "AudioWAV/1002_TIE_FEA_LO.wav",
    "AudioWAV/1003_MTI_NEU_XX.wav",
    "AudioWAV/1003_ITS_DIS_MD.wav",
    "AudioWAV/1003_IWW_SAD_XX.wav",
    "AudioWAV/1004_DFA_SUR_XX.wav",  # not a CREMA-D emotion
    "AudioWAV/1004_DFA.wav",
    "AudioMP3/1001_DFA_ANG_XX.mp3",  # the MP3 copy is not counted twice
]


def test_cremad_without_demographics(tmp_path: Path) -> None:
    touch(tmp_path, *CREMAD_NAMES)
    result = catalog("cremad", tmp_path)
    got = [(c.path.stem, c.label, c.speaker, c.gender) for c in result.clips]
    assert got == [
        ("1001_DFA_ANG_XX", "angry", "1001", "unknown"),
        ("1001_IEO_HAP_HI", "happy", "1001", "unknown"),
        ("1002_TIE_FEA_LO", "fearful", "1002", "unknown"),
        ("1003_ITS_DIS_MD", "disgust", "1003", "unknown"),
        ("1003_IWW_SAD_XX", "sad", "1003", "unknown"),
        ("1003_MTI_NEU_XX", "neutral", "1003", "unknown"),
    ]
    assert result.clips[1].extra == {"statement": "IEO", "intensity": "high"}
    assert len(result.skipped) == 2
    assert any("unknown CREMA-D emotion SUR" in line for line in result.skipped)
    assert any("1004_DFA.wav: not a CREMA-D name" in line for line in result.skipped)


DEMOGRAPHICS = (
    "ActorID,Age,Sex,Race,Ethnicity\n"
    "1001,51,Male,Caucasian,Not Hispanic\n"
    "1002,21,Female,Caucasian,Not Hispanic\n"
    "1003,21,Female,Caucasian,Not Hispanic\n"
)


@pytest.mark.parametrize("where", ["root", "parent"])
def test_cremad_reads_video_demographics(tmp_path: Path, where: str) -> None:
    root = tmp_path / "CREMA-D"
    touch(root, *CREMAD_NAMES)
    audio = root / "AudioWAV"
    csv_dir = audio if where == "root" else root
    (csv_dir / "VideoDemographics.csv").write_text(DEMOGRAPHICS)
    genders = {c.speaker: c.gender for c in catalog("cremad", audio).clips}
    assert genders == {"1001": "male", "1002": "female", "1003": "female"}


def test_cremad_bad_demographics_names_the_file(tmp_path: Path) -> None:
    touch(tmp_path, "1001_DFA_ANG_XX.wav")
    (tmp_path / "VideoDemographics.csv").write_text("id,gender\n1001,m\n")
    with pytest.raises(KndError, match=r"VideoDemographics\.csv: expected columns ActorID and Sex"):
        catalog("cremad", tmp_path)


# ----------------------------------------------------------------------------- tess


def test_tess_layout_as_distributed(tmp_path: Path) -> None:
    root = tmp_path / "TESS Toronto emotional speech set data"
    touch(
        root,
        "OAF_angry/OAF_back_angry.wav",
        "OAF_Fear/OAF_back_fear.wav",
        "OAF_Pleasant_surprise/OAF_back_ps.wav",
        "YAF_disgust/YAF_bean_disgust.wav",
        "YAF_happy/YAF_bean_happy.wav",
        "YAF_neutral/YAF_bean_neutral.wav",
        "YAF_pleasant_surprised/YAF_bean_pleasant_surprise.wav",
        "YAF_sad/YAF_bean_sad.wav",
        "YAF_sad/YAF_bean_bored.wav",
        "YAF_sad/XYZ_bean_sad.wav",
    )
    result = catalog("tess", tmp_path)
    got = {(c.speaker, c.extra["word"], c.label) for c in result.clips}
    assert got == {
        ("OAF", "back", "angry"),
        ("OAF", "back", "fearful"),
        ("OAF", "back", "surprised"),
        ("YAF", "bean", "disgust"),
        ("YAF", "bean", "happy"),
        ("YAF", "bean", "neutral"),
        ("YAF", "bean", "surprised"),
        ("YAF", "bean", "sad"),
    }
    assert {c.gender for c in result.clips} == {"female"}
    assert len(result.skipped) == 2
    assert any("unknown TESS emotion 'bored'" in line for line in result.skipped)
    assert any("XYZ_bean_sad.wav: not a TESS name" in line for line in result.skipped)


def test_tess_copy_nested_twice_is_counted_once(tmp_path: Path) -> None:
    touch(tmp_path, "set/OAF_angry/OAF_back_angry.wav", "set/set/OAF_angry/OAF_back_angry.wav")
    result = catalog("tess", tmp_path)
    assert len(result.clips) == 1
    assert len(result.skipped) == 1
    assert "duplicate of" in result.skipped[0]


# ----------------------------------------------------------------------------- folder


def test_folder_labels_synonyms_and_speakers(tmp_path: Path) -> None:
    touch(
        tmp_path,
        "Angry/spk1_take1.wav",
        "fear/spk2-x.flac",
        "surprise/spk1_b.ogg",
        "ps/spk3_c.mp3",
        "Happy/nested/spk4_d.wav",
        "boredom/spk1_e.wav",
        "loose.wav",
        "sad/notes.txt",
    )
    result = catalog("folder", tmp_path)
    got = [(c.path.name, c.label, c.speaker, c.gender) for c in result.clips]
    assert got == [
        ("spk1_take1.wav", "angry", "spk1", "unknown"),
        ("spk4_d.wav", "happy", "spk4", "unknown"),
        ("spk2-x.flac", "fearful", "spk2", "unknown"),
        ("spk3_c.mp3", "surprised", "spk3", "unknown"),
        ("spk1_b.ogg", "surprised", "spk1", "unknown"),
    ]
    assert len(result.skipped) == 2
    assert any("unknown label 'boredom'" in line for line in result.skipped)
    assert any("loose.wav: not inside a label folder" in line for line in result.skipped)


def test_folder_custom_speaker_regex(tmp_path: Path) -> None:
    touch(tmp_path, "sad/clip_speakerA_01.wav", "sad/nospeaker.wav")
    result = catalog("folder", tmp_path, speaker_regex=r"speaker(?P<speaker>[A-Z])")
    assert [c.speaker for c in result.clips] == ["A", "unknown"]


@pytest.mark.parametrize(
    ("regex", "message"),
    [(r"(?P<speaker>[a-z", "not a valid regex"), (r"^(\w+)", "needs a named group")],
)
def test_folder_bad_speaker_regex(tmp_path: Path, regex: str, message: str) -> None:
    touch(tmp_path, "sad/a.wav")
    with pytest.raises(KndError, match=message):
        catalog("folder", tmp_path, speaker_regex=regex)


def test_normalize_label_vocabulary() -> None:
    assert [normalize_label(label.upper()) for label in LABELS] == LABELS
    synonyms = ["fear", "Surprise", "ps", "Pleasant_Surprise", "pleasant surprise", "anger"]
    assert [normalize_label(s) for s in synonyms] == [
        "fearful",
        "surprised",
        "surprised",
        "surprised",
        "surprised",
        "angry",
    ]
    assert normalize_label("bored") is None


# ----------------------------------------------------------------------------- errors


def test_unknown_dataset_lists_valid_names(tmp_path: Path) -> None:
    with pytest.raises(KndError, match="ravdess, cremad, tess, folder, synth"):
        catalog("iemocap", tmp_path)


@pytest.mark.parametrize("name", ["ravdess", "cremad", "tess", "folder", "synth"])
def test_missing_or_empty_root_names_the_folder(tmp_path: Path, name: str) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(KndError, match=f"{missing} does not exist"):
        catalog(name, missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(KndError, match=f"{empty} is empty"):
        catalog(name, empty)


def test_no_clips_quotes_the_first_reason(tmp_path: Path) -> None:
    touch(tmp_path, "OAF_back_angry.wav")
    with pytest.raises(KndError, match=r"no clips found .* first: .*not a RAVDESS name"):
        catalog("ravdess", tmp_path)


# ----------------------------------------------------------------------------- real data


def test_shared_ravdess_subset(ravdess_root: Path) -> None:
    result = catalog("ravdess", ravdess_root)
    clips = result.clips
    assert result.skipped == []
    assert len(clips) == 960
    speakers = Counter(c.speaker for c in clips)
    assert len(speakers) == 16
    assert set(speakers.values()) == {60}
    labels = Counter(c.label for c in clips)
    assert set(labels) == set(LABELS)
    # Per actor: neutral has no strong take (2 statements x 2 repetitions), the others 8.
    assert labels["neutral"] == 16 * 4 == 64
    assert all(labels[label] == 16 * 8 for label in LABELS if label != "neutral")
    assert Counter(c.gender for c in clips) == {"male": 480, "female": 480}
    assert {c.path.suffix for c in clips} == {".wav", ".flac"}


def test_linked_actor_folders_are_found_once_and_a_loop_ends(tmp_path: Path) -> None:
    """A data set put together from links to another disk: every linked speaker is
    catalogued, and a link back up the tree neither loops nor duplicates clips."""
    elsewhere = tmp_path / "disk2" / "Actor_02"
    touch(elsewhere.parent, "Actor_02/03-01-05-02-02-02-02.wav")
    root = tmp_path / "raw"
    touch(root, "Actor_01/03-01-05-02-02-02-01.wav")
    (root / "Actor_02").symlink_to(elsewhere, target_is_directory=True)
    (root / "Actor_01" / "up").symlink_to(root, target_is_directory=True)
    clips = catalog("ravdess", root).clips
    assert sorted(c.speaker for c in clips) == ["01", "02"]
