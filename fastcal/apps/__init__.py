"""The applications behind the ``fastcal`` command, apart from the library: ``demo`` (train a small
model on synthetic scenes, calibrate it on a shifted domain, score both) and ``study`` (the
paper's open questions on the demo's domains). They use fastcal as any user would."""
