from urllib.parse import quote

import pytest
from sqlalchemy.engine import make_url

from regflow.errors import ConfigError
from regflow.redact import (
    check_unambiguous,
    is_database_url,
    redact_text,
    redact_url,
    redact_value,
    redact_values,
)


@pytest.mark.parametrize(("url", "shown"), [
    ("postgresql://optuna:secret@db:5432/optuna", "postgresql://optuna:***@db:5432/optuna"),
    ("postgresql+psycopg2://optuna:s%40cr%2Fet@db/optuna",
     "postgresql+psycopg2://optuna:***@db/optuna"),  # percent-encoded "@" and "/"
    ("postgresql://optuna:p@ss@db/optuna", "postgresql://optuna:***@db/optuna"),  # raw "@"
    ("http://admin:secret@mlflow.local:5000/api", "http://admin:***@mlflow.local:5000/api"),
    ("mysql://optuna@db/optuna?password=secret&ssl=1", "mysql://optuna@db/optuna?password=***&ssl=1"),
    ("http://mlflow.local:5000/?PWD=secret", "http://mlflow.local:5000/?PWD=***"),
])
def test_passwords_are_masked(url, shown):
    assert redact_url(url) == shown
    assert redact_text(f"cannot open {url!r}: refused") == f"cannot open {shown!r}: refused"


@pytest.mark.parametrize("url", [
    "postgresql://optuna@db:5432/optuna", "sqlite:////abs/models/tuning/optuna.db",
    "sqlite:///relative.db", "http://127.0.0.1:5000", "file:///data/raw", "",
])
def test_urls_without_a_password_are_unchanged(url):
    assert redact_url(url) == url
    assert redact_text(url) == url


def test_redact_url_of_none_is_none():
    assert redact_url(None) is None


def test_text_keeps_everything_but_the_passwords():
    text = "tried http://u:one@a:1/x and postgresql://v:two@b/y; mail me at ops@example.org"
    assert redact_text(text) == ("tried http://u:***@a:1/x and postgresql://v:***@b/y; "
                                 "mail me at ops@example.org")


def test_redact_values_walks_a_config_tree():
    tree = {"tune": {"storage": "postgresql://optuna:secret@db/optuna", "trials": 4},
            "hosts": ["http://a:secret@h", ("sqlite:///x.db", 1.5)], "seed": None}
    assert redact_values(tree) == {
        "tune": {"storage": "postgresql://optuna:***@db/optuna", "trials": 4},
        "hosts": ["http://a:***@h", ("sqlite:///x.db", 1.5)], "seed": None}
    assert tree["tune"]["storage"] == "postgresql://optuna:secret@db/optuna"  # a copy


PASSWORDS = ["SECRET/PW", "p@ss@word", "pa#ss", "100%pure", "us:er:pw", "pass word here",
             "a/b@c#d%e:f g"]


@pytest.mark.parametrize("password", PASSWORDS)
def test_percent_encoded_passwords_read_alike_and_are_masked(password):
    url = f"postgresql+psycopg://regflow:{quote(password, safe='')}@127.0.0.1:5432/optuna"
    check_unambiguous(url, "tune.storage")
    assert make_url(url).password == password  # what SQLAlchemy connects with
    shown = redact_url(url)
    assert shown == "postgresql+psycopg://regflow:***@127.0.0.1:5432/optuna"
    text = redact_text(f"could not open {url}: {password!r} or {quote(password)} refused")
    assert password not in text and quote(password, safe="") not in text
    assert "regflow:***@127.0.0.1:5432/optuna" in text


@pytest.mark.parametrize(("password", "ambiguous"), [
    ("SECRET/PW", True), ("p@ss@word", True), ("pa#ss", True), ("pa?ss", True),
    ("100%pure", False), ("us:er:pw", False), ("pass word here", False)])
def test_raw_passwords_the_parsers_read_differently_are_refused_and_masked(password, ambiguous):
    url = f"postgresql://regflow:{password}@127.0.0.1:5432/optuna"
    shown = redact_url(url)
    assert shown == "postgresql://regflow:***@127.0.0.1:5432/optuna"
    assert redact_value(f"{url}") == shown
    if not ambiguous:
        check_unambiguous(url, "tune.storage")
        assert make_url(url).password == password
        return
    with pytest.raises(ConfigError) as error:
        check_unambiguous(url, "tune.storage")
    message = str(error.value)
    assert message.startswith("tune.storage: postgresql://regflow:***@127.0.0.1:5432/optuna: "
                              "SQLAlchemy and RFC 3986 read")
    assert password not in message and "percent-encode" in message


def test_passwords_seen_once_are_masked_in_any_later_text():
    redact_url("postgresql://regflow:Rem%2Fembered Pw@db/optuna")
    assert redact_text("psql: 'Rem/embered Pw' is wrong; Rem%2Fembered%20Pw too") == (
        "psql: '***' is wrong; *** too")
    redact_url("postgresql://regflow:abc@db/optuna")  # too short to mask in every text
    assert redact_text("abc") == "abc"


def test_an_unreadable_url_keeps_only_its_scheme():
    assert redact_url("postgresql://regflow:SECRET/PW") == "postgresql://***"  # no "@"
    assert redact_url("http://host:notaport/x") == "http://***"


def test_only_dialect_urls_are_database_urls():
    assert is_database_url("postgresql+psycopg://u@h/db") and is_database_url("sqlite:///x.db")
    for url in ("http://u:p@h/x", "file:///data", "models:/regflow@champion", "not a url",
                "postgresql+nosuchdriver://u@h/db"):
        assert not is_database_url(url)
        check_unambiguous(url, "x")  # nothing to compare: passes


def test_a_url_with_a_blank_in_its_password_is_masked_in_texts_once_read():
    url = "postgresql://regflow:Blank Secret%2Fx@db/optuna"
    check_unambiguous(url, "tune.storage")  # regflow reads every storage URL before using it
    masked = redact_text(f"cannot open {url} (timeout)")
    assert masked == "cannot open postgresql://regflow:***@db/optuna (timeout)"


def test_a_database_url_sqlalchemy_cannot_read_is_refused_masked():
    url = "postgresql+psycopg://special:SECRET/PW @#%:x@127.0.0.1:5432/optuna"  # port "x@127..."
    with pytest.raises(ConfigError) as error:
        check_unambiguous(url, "tune.storage")
    assert str(error.value).startswith(
        "tune.storage: postgresql+psycopg://special:***@127.0.0.1:5432/optuna: SQLAlchemy and "
        "RFC 3986 read")
