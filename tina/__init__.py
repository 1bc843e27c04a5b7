"""Tina: text-to-model. Type a task, get a working classifier, no data and no fine-tuning.

    from tina import Tina, load_generated
    model = Tina.from_pretrained("default").generate("classify sneakers vs sandals")
"""

__version__ = "0.1.0"
__all__ = ["Tina", "load_generated", "TinaError", "__version__"]


def __getattr__(name):  # lazy: `tina --help` and `import tina` stay fast
    if name == "Tina":
        from tina.sample import Tina

        return Tina
    if name == "load_generated":
        from tina.export import load_generated

        return load_generated
    if name == "TinaError":
        from tina.errors import TinaError

        return TinaError
    raise AttributeError(name)
