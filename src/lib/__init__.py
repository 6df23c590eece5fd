"""Libraries the pipeline's stages share: each module is the one home of its concern (see README, "Code map").

The stages are the commands in src/; they import from here and never from each other.
"""
