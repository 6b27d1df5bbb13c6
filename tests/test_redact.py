import pytest

from regflow.redact import redact_text, redact_url, redact_values


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
