"""Captions: every English phrasing of a scene or a digit, and the foreign ones curation drops."""

from __future__ import annotations

from tasks.sample_web.digits import DIGIT_WORDS
from tasks.sample_web.scenes import Scene

COUNT_WORDS = ("zero", "one", "two", "three", "four")


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


_POSITION_PHRASES = {
    "left": ("on the left", "on the left side"),
    "right": ("on the right", "on the right side"),
    "top": ("at the top", "near the top"),
    "bottom": ("at the bottom", "near the bottom"),
    "center": ("in the center", "in the middle"),
}


def scene_captions(scene: Scene) -> list[str]:
    """Every English phrasing of a scene ("a red circle", "two small blue stars on the left")."""
    n, colour, size = scene.count, scene.colour, scene.size
    noun = scene.shape if n == 1 else scene.shape + "s"
    det = article(colour) if n == 1 else COUNT_WORDS[n]
    det_size = article(size) if n == 1 else COUNT_WORDS[n]
    pos = _POSITION_PHRASES[scene.position]
    be = "is" if n == 1 else "are"
    return [
        f"{det} {colour} {noun}",
        f"{det_size} {size} {colour} {noun} {pos[0]}",
        f"a photo of {det} {colour} {noun}",
        f"{det} {colour} {noun} {pos[1]}",
        f"{n} {size} {colour} {noun}",
        f"a drawing of {det_size} {size} {colour} {noun}",
        f"there {be} {det} {colour} {noun} {pos[0]}",
        f"{colour} {noun} {pos[1]}",
        f"an image of {det_size} {size} {colour} {noun} {pos[0]}",
        f"{COUNT_WORDS[n]} {colour} {noun} on a plain background",
    ]


# Non-English captions, in French, German and Spanish: (singular, plural) forms.
_FR_SHAPES = {
    "circle": ("cercle", "cercles", "m"),
    "square": ("carré", "carrés", "m"),
    "triangle": ("triangle", "triangles", "m"),
    "star": ("étoile", "étoiles", "f"),
}
_FR_COLOURS = {  # masculine, feminine (+ "s" in the plural unless invariable)
    "red": ("rouge", "rouge"),
    "orange": ("orange", "orange"),
    "yellow": ("jaune", "jaune"),
    "green": ("vert", "verte"),
    "blue": ("bleu", "bleue"),
    "purple": ("violet", "violette"),
    "brown": ("marron", "marron"),
    "black": ("noir", "noire"),
    "white": ("blanc", "blanche"),
}
_FR_INVARIABLE = {"orange", "brown"}  # orange, marron
_DE_SHAPES = {  # nominative singular, dative plural
    "circle": ("Kreis", "Kreisen"),
    "square": ("Quadrat", "Quadraten"),
    "triangle": ("Dreieck", "Dreiecken"),
    "star": ("Stern", "Sternen"),
}
# dative after "einem" and in the plural: the adjective ends in -en in every gender
_DE_COLOURS = {
    "red": "roten",
    "orange": "orangefarbenen",
    "yellow": "gelben",
    "green": "grünen",
    "blue": "blauen",
    "purple": "lila",
    "brown": "braunen",
    "black": "schwarzen",
    "white": "weißen",
}
_ES_SHAPES = {
    "circle": ("círculo", "círculos", "m"),
    "square": ("cuadrado", "cuadrados", "m"),
    "triangle": ("triángulo", "triángulos", "m"),
    "star": ("estrella", "estrellas", "f"),
}
_ES_COLOURS = {  # masculine, feminine, plural masculine, plural feminine
    "red": ("rojo", "roja", "rojos", "rojas"),
    "orange": ("naranja", "naranja", "naranja", "naranja"),
    "yellow": ("amarillo", "amarilla", "amarillos", "amarillas"),
    "green": ("verde", "verde", "verdes", "verdes"),
    "blue": ("azul", "azul", "azules", "azules"),
    "purple": ("morado", "morada", "morados", "moradas"),
    "brown": ("marrón", "marrón", "marrones", "marrones"),
    "black": ("negro", "negra", "negros", "negras"),
    "white": ("blanco", "blanca", "blancos", "blancas"),
}
_COUNTS = {"fr": ("deux", "trois", "quatre"), "de": ("zwei", "drei", "vier")}
_COUNTS["es"] = ("dos", "tres", "cuatro")


def foreign_scene_caption(colour: str, shape: str, count: int, lang: str) -> str:
    """A French, German or Spanish sentence about `count` shapes of one colour."""
    number = _COUNTS[lang][count - 2] if count > 1 and lang in _COUNTS else None
    if lang == "fr":
        singular, plural, gender = _FR_SHAPES[shape]
        adj = _FR_COLOURS[colour][gender == "f"]
        if number is None:
            return (
                f"Une image d'{'une' if gender == 'f' else 'un'} {singular} {adj} sur un fond uni."
            )
        adj += "" if colour in _FR_INVARIABLE else "s"
        return f"Une image de {number} {plural} {adj} sur un fond uni."
    if lang == "de":
        singular, plural = _DE_SHAPES[shape]
        if number is None:
            return f"Ein Bild mit einem {_DE_COLOURS[colour]} {singular}."
        return f"Ein Bild mit {number} {_DE_COLOURS[colour]} {plural}."
    if lang == "es":
        singular, plural, gender = _ES_SHAPES[shape]
        adj = _ES_COLOURS[colour][(gender == "f") + 2 * (number is not None)]
        if number is None:
            return f"Una imagen de {'una' if gender == 'f' else 'un'} {singular} {adj}."
        return f"Una imagen de {number} {plural} {adj}."
    raise ValueError(f"unknown language {lang!r}; expected fr, de or es")


_DIGITS_FR = ("zéro", "un", "deux", "trois", "quatre", "cinq", "six", "sept", "huit", "neuf")
_DIGITS_DE = ("null", "eins", "zwei", "drei", "vier", "fünf", "sechs", "sieben", "acht", "neun")
_DIGITS_ES = ("cero", "uno", "dos", "tres", "cuatro", "cinco", "seis", "siete", "ocho", "nueve")


def foreign_digit_caption(digit: int, lang: str) -> str:
    """A French, German or Spanish sentence about a handwritten digit."""
    if lang == "fr":
        return f"Le chiffre {_DIGITS_FR[digit]} écrit à la main."
    if lang == "de":
        return f"Die Ziffer {_DIGITS_DE[digit]}, von Hand geschrieben."
    if lang == "es":
        return f"El número {_DIGITS_ES[digit]} escrito a mano."
    raise ValueError(f"unknown language {lang!r}; expected fr, de or es")


def digit_captions(digit: int, inverted: bool) -> list[str]:
    """Every English phrasing of a handwritten digit, with words and numerals."""
    word = DIGIT_WORDS[digit]
    medium = "chalk on a blackboard" if inverted else "ink on paper"
    return [
        f"the digit {digit}",
        f"a handwritten {word}",
        f"number {digit} written by hand",
        f"a photo of the digit {word}",
        f"handwritten digit {digit}",
        f"the number {word}, handwritten",
        f"a scan of a handwritten {digit}",
        f"a {word} written in {medium}",
        f"the digit {word} in {medium}",
    ]
