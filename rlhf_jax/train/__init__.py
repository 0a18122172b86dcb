"""Loop pieces shared by the SFT, RM and PPO stages."""
