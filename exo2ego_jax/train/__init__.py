"""Training: configs -> sharded state -> one jitted step per stage -> checkpoints and exports."""
