"""Running trainings: ``hpo search`` on Ray and ``hpo promote``'s final run.

:mod:`hpo.run.sweep` checks everything, opens the records and puts the trials on Ray
(:mod:`hpo.run.scheduling`, :mod:`hpo.run.cluster`, :mod:`hpo.run.distributed`), shown live
by :mod:`hpo.run.progress`; :mod:`hpo.run.promote` trains the best trial's config once more.

The one part of hpo that may import Ray (and every other part of hpo); nothing outside it but
the command line imports it.
"""
