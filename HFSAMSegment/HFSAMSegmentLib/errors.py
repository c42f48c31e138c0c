"""The one error type the panel shows to the user as is.

``UserInputError`` carries one line that names the problem and what to do
(same rule as the engine's ``InputError``); the panel shows it in a message box.
Any other exception is a bug and is shown with its traceback in the log.
"""


class UserInputError(ValueError):
    """Bad input from the user (wrong node type, empty segment, existing file...)."""
