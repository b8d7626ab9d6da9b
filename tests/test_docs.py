"""The README's configuration table is generated from the settings; a flag added there must show up."""

from pathlib import Path

from kleinserve.service.settings import OPTIONS, options_markdown_table

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_configuration_table_matches_the_settings():
    text = README.read_text()
    start = text.index("<!-- options-table:start")
    start = text.index("\n", start) + 1
    end = text.index("<!-- options-table:end -->")
    assert text[start:end].strip() == options_markdown_table().strip(), (
        "README's configuration table is stale: paste kleinserve.service.settings.options_markdown_table()")


def test_every_serve_flag_is_documented():
    text = README.read_text()
    for opt in OPTIONS:
        assert f"`{opt.flags[0]}`" in text and f"`{opt.env}`" in text
