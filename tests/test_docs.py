"""The README's configuration table is generated from the settings; a flag added there must show up."""

from pathlib import Path

from kleinserve.service.settings import (
    OPTIONS,
    format_duration,
    format_size,
    options_markdown_table,
    parse_duration,
    parse_size,
    shown_default,
)

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


def test_defaults_are_shown_in_the_units_their_flags_take():
    assert (format_duration(604800.0), format_duration(1800.0), format_duration(90.0),
            format_duration(0.5), format_duration(0)) == ("7d", "30m", "90s", "0.5s", "0s")
    assert (format_size(8 << 20), format_size(100 << 20), format_size(3 << 30), format_size(1536),
            format_size(1000)) == ("8MiB", "100MiB", "3GiB", "1536", "1000")
    for opt in OPTIONS:
        if opt.parse in (parse_duration, parse_size):
            assert opt.parse(shown_default(opt)) == opt.default, opt.name
