"""What a person runs: the `musegen` CLI, the UI launcher and the listening session."""
