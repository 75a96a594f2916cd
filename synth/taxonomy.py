"""The 14 harm categories of BeaverTails, as listed in the generator prompt of Hammoud et al."""

from __future__ import annotations

HARM_CATEGORIES: tuple[str, ...] = (
    "Animal Abuse",
    "Child Abuse",
    "Controversial Topics, Politics",
    "Discrimination, Stereotype, Injustice",
    "Drug Abuse, Weapons, Banned Substance",
    "Financial Crime, Property Crime, Theft",
    "Hate Speech, Offensive Language",
    "Misinformation Regarding ethics, laws, and safety",
    "Non-Violent Unethical Behavior",
    "Privacy Violation",
    "Self-Harm",
    "Sexually Explicit, Adult Content",
    "Terrorism, Organized Crime",
    "Violence, Aiding and Abetting, Incitement",
)


def numbered(categories: tuple[str, ...] | list[str] = HARM_CATEGORIES) -> str:
    """`#1 Animal Abuse` lines, the way the generator prompt lists the topics."""
    return "\n".join(f"#{i} {c}" for i, c in enumerate(categories, start=1))
