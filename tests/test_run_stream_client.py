"""The coordinator's side of RunExpertsStream against hosts made here to misbehave (in-process
grpc.aio servers, no shard): an older host without the stream gets unary calls; a host that
answers a request id it was not asked, or a reply of the wrong shape, fails that call with an
error naming the host and its stream is torn down, the next call opening a new one."""

import asyncio

import grpc
import pytest
import torch

from common.host_address import HostAddress
from common.rpc import expert_host_pb2 as pb
from common.rpc.wire_limits import server_options
from coordinator.sources.host_client import ClientCredentials, HostCallError, HostClient
from expert_host.servicer import SERVICE_NAME

HIDDEN = 16


def unary_sum(request, context):
    tokens = request.shape[0]
    return pb.RunExpertsReply(shape=[tokens, HIDDEN], output=torch.full((tokens, HIDDEN), 2.0).numpy().tobytes())


async def serving(handlers):
    """A server answering only `handlers` (method name -> handler) on 127.0.0.1, and its address."""
    server = grpc.aio.server(options=server_options())
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, HostAddress.parse(f"127.0.0.1:{port}")


def unary_handler():
    async def run(request, context):
        return unary_sum(request, context)

    return grpc.unary_unary_rpc_method_handler(run, request_deserializer=pb.RunExpertsRequest.FromString,
                                               response_serializer=pb.RunExpertsReply.SerializeToString)


def stream_handler(answer):
    """A RunExpertsStream whose reply to each request is `answer(request)`."""

    async def run(requests, context):
        async for request in requests:
            yield answer(request)

    return grpc.stream_stream_rpc_method_handler(run, request_deserializer=pb.RunExpertsRequest.FromString,
                                                 response_serializer=pb.RunExpertsReply.SerializeToString)


async def run_once(client, tokens=2):
    hidden, weights = torch.randn(tokens, HIDDEN), torch.ones(tokens, 1)
    return await client.run_experts(0, [0], hidden, weights, timeout_s=5)


def test_an_older_host_without_the_stream_gets_unary_calls():
    async def scenario():
        server, address = await serving({"RunExperts": unary_handler()})
        client = HostClient(address, ClientCredentials())
        try:
            first = await run_once(client)
            second = await run_once(client)
            return first, second, client.stream_runs, client.run_stream_open
        finally:
            await client.close()
            await server.stop(0)

    first, second, stream_runs, stream_open = asyncio.run(scenario())
    assert torch.equal(first, torch.full((2, HIDDEN), 2.0)) and torch.equal(second, first)
    assert not stream_runs and not stream_open


def right(request):
    reply = unary_sum(request, None)
    reply.request_id = request.request_id
    return reply


def other_id(request):
    reply = right(request)
    reply.request_id = request.request_id + 1000
    return reply


def wrong_shape(request):
    reply = right(request)
    reply.output = reply.output[:-4]
    return reply


@pytest.mark.parametrize("lie,words", [(other_id, "answered RunExperts request 1001, which is not in flight"),
                                       (wrong_shape, "with shape [2, 16] and 124 bytes")], ids=["other id", "wrong shape"])
def test_a_host_that_lies_on_its_stream_fails_the_call_and_its_stream_is_torn_down(lie, words):
    answers = [lie, right]  # the first stream lies, the second answers right

    def answer(request):
        return answers[0](request)

    async def scenario():
        server, address = await serving({"RunExperts": unary_handler(), "RunExpertsStream": stream_handler(answer)})
        client = HostClient(address, ClientCredentials())
        try:
            with pytest.raises(HostCallError) as lied:
                await run_once(client)
            torn_down = not client.run_stream_open
            answers.pop(0)
            again = await run_once(client)
            return lied.value, torn_down, again, client.run_stream_open
        finally:
            await client.close()
            await server.stop(0)

    error, torn_down, again, open_again = asyncio.run(scenario())
    assert words in str(error) and "127.0.0.1:" in str(error)
    assert torn_down and open_again
    assert torch.equal(again, torch.full((2, HIDDEN), 2.0))
