"""LeNet as in the paper's MNIST experiments (the authors' archs/lenet.py)."""

import keras


def lenet(num_classes: int, input_shape=(28, 28, 1), name: str = "lenet") -> keras.Sequential:
    """conv 20@5x5, max-pool 2, conv 50@5x5, max-pool 2, dense 500, dense classes; ReLU; logits out.

    Kernels are initialized like PyTorch's default (Kaiming-uniform with
    a = sqrt(5), i.e. uniform(+-1/sqrt(fan_in))) so the authors' learning rate
    transfers; biases start at zero.
    """
    def init():
        return keras.initializers.VarianceScaling(1.0 / 3.0, "fan_in", "uniform")

    def conv(filters):
        return keras.layers.Conv2D(filters, 5, activation="relu", kernel_initializer=init())

    def dense(units, activation=None, **kwargs):
        return keras.layers.Dense(units, activation=activation, kernel_initializer=init(), **kwargs)

    return keras.Sequential([
        keras.Input(input_shape),
        conv(20),
        keras.layers.MaxPooling2D(2),
        conv(50),
        keras.layers.MaxPooling2D(2),
        keras.layers.Flatten(),
        dense(500, "relu"),
        dense(num_classes, dtype="float32"),  # float32 logits under mixed precision.
    ], name=name)
