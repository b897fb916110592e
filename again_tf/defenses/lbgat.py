"""LBGAT (Cui et al., ICCV 2021): a robust student guided by a jointly trained clean teacher."""

import keras
import tensorflow as tf

from again_tf import models
from again_tf.attacks import losses
from again_tf.defenses.trades import TRADES, kl_divergence
from again_tf.heads import paired_head_loss
from again_tf.models.base import Classifier, forward


@keras.saving.register_keras_serializable(package="again_tf")
class LBGAT(TRADES):
    """Learnable boundary guided adversarial training. Name: `lbgat`.

    Cui, Liu, Wang & Jia, "Learnable Boundary Guided Adversarial Training", ICCV 2021.
    A natural classifier f_nat (the teacher) is trained jointly with the robust model
    f_rob (the student) by the same optimizer; per example,

        L = mean_k (f_rob(x_adv)_k − f_nat(x)_k)² + CE(f_nat(x), y)
            + β · KL(f_rob(x) ‖ f_rob(x_adv)),

    as the official `lbgat_loss` computes it (`MSELoss` averaged over batch and classes,
    `CrossEntropyLoss` on the teacher's clean logits, the TRADES KL divided by the batch
    size); every term is differentiated, so the MSE also pulls the teacher toward the
    student. The training attack is TRADES's: PGD maximizing KL(f_rob(x) ‖ f_rob(x_adv))
    from x + 0.001·N(0, I). The teacher is a sub-layer of this objective, so the
    `AdversarialModel` trains it (its variables are among `trainable_variables`), applies
    its coupled weight decay to it (the official optimizer holds both networks), and
    saves it in checkpoints. Auxiliary heads of the student get the MSE to the teacher's
    logits and the KL per head, weighted `aux_weight` · mean over heads.

    Args:
        beta: β. Default 6.0 (official `train_lbgat_cifar100.py --beta`, LBGAT6;
            `beta=0` is the paper's LBGAT0).
        teacher: the teacher's architecture: None (default) for a copy of the student's
            (same class and configuration, without inserted layers), a model name of
            `again_tf.models.MODELS` (built with the student's classes and
            normalization; the official CIFAR-100 runs use a ResNet-18 teacher for a
            WRN-34-10 student), or an unbuilt/built Keras model.
        aux_weight: weight of the mean auxiliary-head loss. Default 2.0 (see `Objective`).

    Example:
        adv = AdversarialModel(wrn, defense="lbgat", beta=6.0, teacher="resnet18")
    """

    name = "lbgat"

    def __init__(self, beta=6.0, teacher=None, aux_weight=2.0, **kwargs):
        super().__init__(beta=beta, aux_weight=aux_weight, **kwargs)
        if isinstance(teacher, dict):
            teacher = keras.saving.deserialize_keras_object(teacher)
        if isinstance(teacher, str) and teacher not in models.MODELS:
            raise ValueError(f"Unknown teacher={teacher!r}. Expected None, a Keras model or "
                             f"one of: {', '.join(models.MODELS)}")
        if teacher is not None and not isinstance(teacher, (str, keras.Model)):
            raise ValueError(f"Expected `teacher` to be None, a model name or a Keras model. "
                             f"Received: teacher={teacher!r}")
        self.teacher_spec = teacher
        self.teacher = teacher if isinstance(teacher, keras.Model) else None

    def make_teacher(self, model):
        """The teacher network for the student `model` (not yet built)."""
        spec = self.teacher_spec
        if spec is None:
            if isinstance(model, Classifier):
                config = {**model.get_config(), "inserts": {}, "name": "lbgat_teacher"}
                return type(model).from_config(config)
            return keras.models.clone_model(model)
        if not isinstance(model, Classifier):
            raise ValueError(f"teacher={spec!r} needs an again_tf.models.Classifier student "
                             f"(for its classes and normalization); received a "
                             f"{type(model).__name__}")
        return models.build(spec, model.num_classes, mean=model.mean, std=model.std)

    def attach(self, model):
        """Creates the teacher for the student `model`; called by `AdversarialModel()`."""
        if self.teacher is None:
            self.teacher = self.make_teacher(model)

    def build(self, input_shape):
        """Builds the teacher; called by `AdversarialModel.build`."""
        if self.teacher is not None and not self.teacher.built:
            self.teacher.build(tuple(input_shape))
        self.built = True

    @property
    def decayed_variables(self):
        """The teacher's variables, which the `AdversarialModel`'s weight decay also covers."""
        return [] if self.teacher is None else list(self.teacher.trainable_variables)

    def loss(self, model, x, x_adv, y):
        if self.teacher is None:
            raise ValueError("LBGAT has no teacher yet: use it through an AdversarialModel, "
                             "which calls attach(model) to create the teacher")
        adversarial = self.outputs(model, x_adv, y, training=True, partner=x)
        natural = self.outputs(model, x, y, training=True, partner=x_adv)
        teacher_logits = tf.cast(forward(self.teacher, x, training=True)["logits"], tf.float32)

        def student_terms(nat, adv, _):
            mse = tf.reduce_mean(tf.square(tf.cast(adv, tf.float32) - teacher_logits), axis=-1)
            return mse + self.beta * kl_divergence(nat, adv)

        per_example = (paired_head_loss(natural, adversarial, y, student_terms, self.aux_weight)
                       + losses.cross_entropy(teacher_logits, y))
        return per_example, adversarial["logits"]

    def get_config(self):
        spec = self.teacher_spec
        if isinstance(spec, keras.Model):
            spec = keras.saving.serialize_keras_object(spec)
        return {**super().get_config(), "teacher": spec}
