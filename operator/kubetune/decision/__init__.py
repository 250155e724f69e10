"""The operator's decision, in small pure modules: pods (reading pods, classifying losses),
conditions (status vocabulary, conditions, merge patches), reports (a trainer's progress
and termination message made fit for status), refusals (a refused create), and decide
(the whole decision for one job: decide() -> Plan)."""
