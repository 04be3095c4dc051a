"""Flower client side of the MedMerge federation, a thin adapter over medmerge_core:
`client_app` (the ClientApp: one handler per message type, each checked against the site's
policy first; SecAgg+ stages under `secagg = true`) and `site_runtime` (`medmerge-clientapp`,
which checks a delivered app bundle against the site policy before Flower installs it, and
the site's CLI, `medmerge site ...`)."""
