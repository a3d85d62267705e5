"""Secret references: value / env / file, how each resolves and fails, and that no form of a secret shows its value."""

from __future__ import annotations

import pytest

from st_proxy.config.secrets import Secret, SecretError, SecretRef, parse_ref, resolve

VALUE = "cs1.distinctive-secret-QX7"


def test_a_plain_string_is_a_literal_reference():
    ref = parse_ref(VALUE)
    assert (ref.kind, ref.literal) == ("value", True)
    assert resolve(ref, {}).reveal() == VALUE


@pytest.mark.parametrize("kind", ["value", "env", "file"])
def test_a_mapping_with_one_known_key_is_a_reference_of_that_kind(kind):
    ref = parse_ref({kind: "x"})
    assert (ref.kind, ref.where, ref.literal) == (kind, "x", kind == "value")


@pytest.mark.parametrize(
    "raw",
    [{}, {"value": "a", "env": "B"}, {"vault": "x"}, {"env": ""}, {"env": 5}, {"file": None}, 42, ["x"], None, ""],
)
def test_malformed_references_are_refused(raw):
    with pytest.raises(SecretError):
        parse_ref(raw)


def test_an_env_reference_reads_the_given_environment_not_the_process_one(monkeypatch):
    monkeypatch.setenv("ST_TEST_SECRET", "from-the-process")
    assert resolve(SecretRef("env", "ST_TEST_SECRET"), {"ST_TEST_SECRET": VALUE}).reveal() == VALUE
    with pytest.raises(SecretError, match="env var ST_TEST_SECRET is not set"):
        resolve(SecretRef("env", "ST_TEST_SECRET"), {})


def test_an_empty_env_var_is_an_error():
    with pytest.raises(SecretError, match="env var ST_X is empty"):
        resolve(SecretRef("env", "ST_X"), {"ST_X": ""})


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (VALUE + "\n", VALUE),  # echo / kubectl leave one newline
        (VALUE + "\r\n", VALUE),  # a file saved on Windows
        (VALUE, VALUE),
        (VALUE + "\n\n", VALUE + "\n"),  # only one newline is ours to drop
        ("  " + VALUE + "  \n", "  " + VALUE + "  "),  # spaces may belong to the secret
    ],
)
def test_a_file_reference_drops_exactly_one_trailing_newline(tmp_path, content, expected):
    path = tmp_path / "secret"
    path.write_bytes(content.encode())
    assert resolve(SecretRef("file", str(path)), {}).reveal() == expected


def test_a_missing_file_is_an_error_naming_the_path(tmp_path):
    path = tmp_path / "absent"
    with pytest.raises(SecretError, match=f"file {path} does not exist"):
        resolve(SecretRef("file", str(path)), {})


@pytest.mark.parametrize("content", [b"", b"\n"])
def test_an_empty_file_is_an_error(tmp_path, content):
    path = tmp_path / "empty"
    path.write_bytes(content)
    with pytest.raises(SecretError, match="is empty"):
        resolve(SecretRef("file", str(path)), {})


def test_an_unreadable_file_is_an_error_with_the_reason(tmp_path):
    # A directory where a file should be: unreadable as a file even for root (chmod 000 is not, in CI containers).
    with pytest.raises(SecretError, match=f"file {tmp_path} cannot be read: Is a directory"):
        resolve(SecretRef("file", str(tmp_path)), {})


def test_a_file_that_is_not_utf8_is_an_error_without_its_bytes(tmp_path):
    path = tmp_path / "binary"
    path.write_bytes(b"\xffQX7-secret-bytes")
    with pytest.raises(SecretError) as caught:
        resolve(SecretRef("file", str(path)), {})
    assert "not UTF-8" in str(caught.value)
    assert "QX7" not in str(caught.value)


def test_no_representation_of_a_secret_shows_its_value():
    secret = resolve(parse_ref(VALUE), {})
    literal_ref = parse_ref({"value": VALUE})
    shown = [
        repr(secret),
        str(secret),
        f"{secret}",
        f"{secret!r}",
        repr(literal_ref),
        str(literal_ref),
        literal_ref.describe(),
        secret.source,
        secret.fingerprint(),
    ]
    for text in shown:
        assert VALUE not in text
        assert "QX7" not in text
    assert "<redacted>" in repr(secret)


def test_env_and_file_references_show_where_the_secret_comes_from():
    assert parse_ref({"env": "ST_CLIENT_SECRET"}).describe() == "env ST_CLIENT_SECRET"
    assert parse_ref({"file": "/run/secrets/st/cs"}).describe() == "file /run/secrets/st/cs"
    assert "ST_CLIENT_SECRET" in repr(parse_ref({"env": "ST_CLIENT_SECRET"}))


def test_a_fingerprint_tells_a_rotated_secret_from_the_old_one():
    old, new = Secret("cs1.old", "env X"), Secret("cs1.new", "env X")
    assert old.fingerprint() != new.fingerprint()
    assert old.fingerprint() == Secret("cs1.old", "file /y").fingerprint()
    assert old == Secret("cs1.old", "file /y") and old != new
