"""The agent's services, one per capability; ``plugin.daemon`` composes them (docs/DESIGN.md, "The agent")."""
