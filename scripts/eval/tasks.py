"""The eight benchmark tasks and their zero-shot class descriptions.

Each class gets one short natural-language description; the pretrained
encoder's embedding of it is the class's row in a fixed cosine head (as in
the CLIP task-arithmetic papers). The heads are never trained, so the base,
the fine-tuned and every merged encoder are scored with the same heads and
only the encoder differs.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Task:
    name: str
    what: str                      # one line for the report
    classes: tuple[tuple[str, str], ...]   # (label, description)

    @property
    def labels(self) -> list[str]:
        return [c for c, _ in self.classes]

    @property
    def descriptions(self) -> list[str]:
        return [d for _, d in self.classes]


TASKS: tuple[Task, ...] = (
    Task("fortune", "fortune cookie -> topic (Debian fortunes)", (
        ("computers", "a joke about computers"),
        ("food", "a quote about food"),
        ("law", "a quote about law and lawyers"),
        ("politics", "a quote about politics"),
        ("science", "a quote about science"),
        ("songs-poems", "a song or a poem"),
        ("startrek", "a Star Trek quote"),
        ("work", "a quote about work and jobs"),
    )),
    Task("debsec", "package short description -> Debian section", (
        ("admin", "a system administration tool"),
        ("games", "a computer game"),
        ("graphics", "a graphics and image program"),
        ("mail", "an email program"),
        ("math", "a mathematics program"),
        ("net", "a networking tool"),
        ("science", "scientific software"),
        ("sound", "an audio and sound program"),
    )),
    Task("wordnet", "noun gloss -> WordNet lexicographer file", (
        ("animal", "an animal"),
        ("artifact", "a man-made object"),
        ("body", "a part of the body"),
        ("food", "a food or drink"),
        ("location", "a place or region"),
        ("person", "a kind of person"),
        ("plant", "a plant"),
        ("substance", "a substance or material"),
    )),
    Task("manpage", "man page 'name - description' -> section", (
        ("1", "a user command"),
        ("2", "a system call"),
        ("3", "a C library function"),
        ("5", "a file format"),
        ("7", "an overview of a topic"),
        ("8", "a system administration command"),
    )),
    Task("language", "word -> language (Debian word lists)", (
        ("english", "an English word"),
        ("french", "a French word"),
        ("german", "a German word"),
        ("spanish", "a Spanish word"),
        ("italian", "an Italian word"),
        ("portuguese", "a Portuguese word"),
        ("dutch", "a Dutch word"),
        ("swedish", "a Swedish word"),
    )),
    Task("names", "first name -> country group (gender-guesser)", (
        ("english", "an English first name"),
        ("italian", "an Italian first name"),
        ("iberian", "a Spanish or Portuguese first name"),
        ("french", "a French first name"),
        ("german", "a German first name"),
        ("nordic", "a Scandinavian first name"),
        ("slavic", "a Slavic first name"),
        ("asian", "an East Asian first name"),
    )),
    Task("sentiment", "word -> sentiment sign (VADER lexicon)", (
        ("negative", "a negative word"),
        ("positive", "a positive word"),
    )),
    Task("code", "four source lines -> programming language", (
        ("python", "Python code"),
        ("c", "a C header"),
        ("cpp", "C++ code"),
        ("shell", "a shell script"),
        ("perl", "Perl code"),
        ("javascript", "JavaScript code"),
        ("sql", "SQL code"),
        ("cmake", "a CMake script"),
    )),
)

BY_NAME = {t.name: t for t in TASKS}
