"""Study drivers: paper reproductions, ablations and robustness studies (see each module)."""
