"""User-facing errors: the CLI turns a TinaError into a one-line message and exit code 2."""


class TinaError(Exception):
    """A mistake in what the user asked for or handed us (bad prompt, missing data, wrong checkpoint).

    Library code raises it with a message that says what is wrong and how to fix it; `tina.cli`
    prints that message without a traceback. Bugs stay ordinary exceptions.
    """
