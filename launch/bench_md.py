"""BENCHMARKS.md's sections, shared by the launch/bench* reports."""

import os


def replace_section(md, heading, section):
    """Puts `section` (starting with `heading`) in place of the section of
    that heading in `md`, or at its end; creates the file if need be.
    Prints the section."""
    text = open(md).read() if os.path.exists(md) else (
        "# Benchmarks\n\nRatios from one run each; these machines are shared and noisy.\n\n")
    start = text.find(heading)
    if start >= 0:
        end = text.find("\n## ", start + 1)
        text = text[:start] + section + (text[end + 1:] if end >= 0 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    with open(md, "w") as f:
        f.write(text)
    print(section)
