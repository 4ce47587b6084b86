"""Each version of the drift pipeline as a TARGET for `connect-worker compat`."""

from . import apps

v1 = [apps.make("v1")]
rename = [apps.make("rename")]
add_end = [apps.make("add_end")]
changed_body = [apps.make("changed_body")]
