"""Text from users and models (model names, categories, objectives) escaped for the SVG and
Markdown files this project writes: report.py's result.svg and report.md, metrics_log.py's
metrics.svg, oracle/study.py's study.md and study.svg."""

from xml.sax.saxutils import escape


def xml(text):
    """Text safe both inside an SVG element and inside a quoted attribute: & < > " ' escaped."""
    return escape(str(text), {'"': "&quot;", "'": "&#39;"})


def md(text):
    """Text safe in a cell of a Markdown table: one line, no column break, no HTML."""
    cell = " ".join(str(text).split()).replace("\\", "\\\\").replace("|", "\\|").replace("`", "\\`")
    return escape(cell)
