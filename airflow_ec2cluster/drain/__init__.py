"""The drain: what the sensor and its trigger both do on every round.

``decisions`` is pure (a snapshot in, a decision out); ``round`` reads the cluster, decides and acts, as a
generator of AWS calls that the sensor drives with the hook and the trigger with async clients. This
package imports neither the sensor nor the trigger, so each loads on its own (the triggerer imports the
trigger by its classpath in a fresh process).
"""
