"""The one exception type for bad user input: its message names the file, key or index."""


class InputError(ValueError):
    """Bad user input (config key, file, index, shape, element). The CLI prints it on one line."""


class OptionError(InputError):
    """Bad input about one option, worded for whoever set it.

    `template` holds ``{option}`` where the option is named and ``{setting}`` where a value of it is
    shown. As raised, the message names the Python keyword / config key (the option ``energy_unit``,
    ``energy_unit='kcal/mol'``); a command-line command rewords it with `for_flag` (``--energy-unit``,
    ``--energy-unit kcal/mol``).
    """

    def __init__(self, template: str, option: str, value: object = None) -> None:
        self.template, self.option, self.value = template, option, value
        super().__init__(self._worded(f"the option `{option}`", f"{option}={value!r}"))

    def for_flag(self, flag: str) -> str:
        """The message naming the command-line flag `flag` instead of the keyword."""
        return self._worded(flag, f"{flag} {self.value}")

    def _worded(self, option: str, setting: str) -> str:
        # plain replacement, not str.format: file names and values in the template may hold braces
        return self.template.replace("{option}", option).replace("{setting}", setting)
