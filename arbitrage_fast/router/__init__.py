"""The router: features of a draft step, the head that scores them, and its training."""
